"""`transferkit collect DIR [DIR ...]`: the runs in sweep folders (Hydra multiruns, `transferkit
sweep` folders, any folders of stage outputs) -> one table and one plot (accuracy against the swept
setting, scratch and linear probe as reference lines).

A run is a folder with the model.pt and params.yaml a stage wrote. What sets runs apart is read
from their params: every setting whose value differs between runs is the swept one. Every run
is scored again on the target test set it was trained for, the way `evaluate` scores, and the
per-image results are cached (DIR/collected/scores.pt), so collecting a growing sweep again
only scores the new runs. Choices are marked on validation accuracy; test accuracy is
reported beside it, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from transferkit.errors import TransferkitError, one_line_errors
from transferkit.evaluation import SCORED_WITH
from transferkit.evaluation.plots import sweep_png
from transferkit.evaluation.runs import Run, assignment, read_run, score, summarize
from transferkit.evaluation.tables import sweep_table
from transferkit.io import make_folder, save_json, save_text, undone_on_failure
from transferkit.plain import dvc_file_data, flatten, out_paths, under
from transferkit.project import is_runs_file, stale_stages
from transferkit.stages import STAGES, TARGET_MODELS
from transferkit.sweep.points import NOT_SWEPT, made_with
from transferkit.tracked import check_untracked


def run_roots(d: Path) -> list[tuple[Path, str | None, Path | None]]:
    """Where d's runs are, with the stage that made each and the prepared task it read (`--in prepare=`: a
    scenarios quadrant's own) where a runs folder's dvc.yaml names them: in a
    `transferkit sweep` or `scenarios` folder (d, or the one d lies in), the outputs its dvc.yaml lists now
    (the points of an earlier sweep into it stay on disk, unlisted), once DVC finds them up to date or unrun;
    in any other folder, all of it, each run named by its folder (STAGE or NAME-STAGE)."""
    home = next((p for p in (d.resolve(), *d.resolve().parents) if is_runs_file(p / "dvc.yaml")), None)
    if home is None:
        sweeps = (f.parent for f in sorted(d.rglob("dvc.yaml")) if is_runs_file(f))
        if inner := next(sweeps, None):
            raise TransferkitError(f"{d} holds the sweep folder {inner}: collected from above, the points of an "
                                   f"earlier sweep into it, which its dvc.yaml no longer lists, would count too. Fix: "
                                   f"give the sweep folders themselves (`transferkit collect {inner} ...`).")
        return [(d, None, None)]
    stages = {name: stage for name, stage in dvc_file_data((home / "dvc.yaml").read_text())["stages"].items()
              if any((home / out).resolve().is_relative_to(d.resolve()) for out in out_paths(stage))}
    points = {name for name, stage in stages.items() if stage["cmd"].split()[1] in TARGET_MODELS}
    stale = {name: out_paths(stages[name]) for name in stale_stages(home) if name in stages}
    # a point with no run at all: failed (a diverged one fails again), killed or not run yet, as a multirun's jobs
    unrun = [name for name, outs in stale.items() if name in points and not any((home / o).exists() for o in outs)]
    if changed := [out for name, outs in stale.items() if name not in unrun for out in outs]:
        raise TransferkitError(f"{d} has outputs not made with their settings and code as they are now ("
                               f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): something they read "
                               f"changed since they were made, or a run stopped while remaking them. Fix: run the "
                               f"command that made them again (DVC runs only those; the scenarios with --only naming "
                               f"them), then collect; or collect a finished quadrant's own folder.")
    if unrun:
        print(f"transferkit collect: {len(unrun)} of {len(points)} points in {home} have no finished run (failed, "
              f"killed or not run yet) and are left out: {', '.join(o for n in unrun for o in stale[n])}",
              file=sys.stderr)
        stages = {name: stage for name, stage in stages.items() if name not in unrun}
    # a scenarios strategy's folder (linear_probe, partial_freeze) is no stage's name: its command names the stage
    return [(home / out, stage["cmd"].split()[1], next((home / a.split("=", 1)[1] for a in shlex.split(stage["cmd"])
                                                        if a.startswith("prepare=")), None))
            for stage in stages.values() for out in out_paths(stage)]


def find_runs(dirs: list[Path]) -> list[Run]:
    for i, d in enumerate(dirs):  # `collect multirun/x multirun/x/` or a folder and one inside it: runs twice over
        if same := next((e for e in dirs[:i] if e.resolve() in (d.resolve(), *d.resolve().parents)
                         or d.resolve() in e.resolve().parents), None):
            raise TransferkitError(f"{same} and {d} are one folder, or one holds the other: their runs would be "
                                   f"found twice. Fix: give each folder once.")
    runs = []
    for d in dirs:
        if not d.is_dir():
            raise TransferkitError(f"{d} is not a folder. Fix: pass a sweep folder (by default multirun/<experiment>).")
        for root, stage, prepared in run_roots(d):
            found = len(runs)
            for model in sorted(root.rglob("model.pt")) if stage is None else [root / "model.pt"]:
                made_by = stage or model.parent.name.split("-")[-1]  # STAGE, or NAME-STAGE
                if model.is_file() and made_by in TARGET_MODELS and not any(
                        p.startswith(".") for p in model.relative_to(root).parts):  # a stage's unfinished work
                    runs.append(read_run(model.parent, made_by, prepared))
            # a Hydra job (its .hydra/) that left no finished run: failed, killed or still running, and not counted;
            # one that finished a stage collect does not score (pretrain -m, into the same multirun/) is no such job
            jobs = [h.parent for h in sorted(root.rglob(".hydra")) if h.is_dir()]
            if left := [str(j.relative_to(root)) for j in jobs
                        if not any(r.folder.is_relative_to(j) for r in runs[found:])
                        and not any((j / s / "params.yaml").is_file() for s in STAGES if s not in TARGET_MODELS)]:
                print(f"transferkit collect: {len(left)} of {len(jobs)} Hydra jobs in {root} have no finished run "
                      f"(failed, killed or still running) and are left out: {', '.join(left)}", file=sys.stderr)
    if not runs:
        raise TransferkitError(f"no finished runs under {', '.join(map(str, dirs))}. Fix: run a sweep first, "
                               f"e.g. `transferkit transfer -m transfer.freeze_depth=0,1,2`.")
    flats = [flatten(r.params) for r in runs]
    tasks = [{k: v for k, v in f.items() if k == "name" or k.startswith("data.")} for f in flats]
    if other := next((i for i, t in enumerate(tasks) if t != tasks[0]), None):
        key = next(k for k in sorted({*tasks[0], *tasks[other]}) if tasks[0].get(k) != tasks[other].get(k))
        raise TransferkitError(f"the runs come from different experiments or data, so they score different test sets: "
                               f"{runs[0].folder} has {key}={json.dumps(tasks[0].get(key))}, {runs[other].folder} "
                               f"{key}={json.dumps(tasks[other].get(key))}. Fix: collect each experiment's sweep "
                               f"folder on its own.")
    swept = sorted({k for f in flats for k in f if len({json.dumps(g.get(k)) for g in flats}) > 1
                    and not under(k, NOT_SWEPT)})
    seen = {}
    for r, f in zip(runs, flats):  # a run's setting: the swept keys of what made it (its stage's params and those
        # of the stages it reads: student's include distill.student, transfer's pretrain), of how it trained
        # (trainer.precision) and of how collect scores it; not another stage's (scratch is the same run whatever
        # pretrain.epochs says)
        made = made_with(r.stage) | {*SCORED_WITH, "trainer"}
        r.setting = tuple(assignment(k, f.get(k)) for k in swept if under(k, made))
        if twin := seen.get((r.stage, r.setting, r.seed)):  # two seeds' worth of confidence from one seed
            raise TransferkitError(f"{twin.folder} and {r.folder} are the same run ({r.stage}, seed {r.seed}"
                                   f"{''.join(f', {o}' for o in r.setting)}), which the table would count as two "
                                   f"seeds. Fix: collect one of them, or run the other with another seed (two "
                                   f"multiruns of one experiment share multirun/<experiment>/ unless each is given "
                                   f"hydra.sweep.dir=DIR).")
        seen[(r.stage, r.setting, r.seed)] = r
    return runs


def collect(dirs: list[Path], out: Path) -> dict:
    runs = find_runs(dirs)
    with undone_on_failure(out, ("scores.pt",)):  # a test set refused, Ctrl+C: no folder of its own left behind
        make_folder(out)  # before scoring, which takes a while
        score(runs, cache_file=out / "scores.pt")
        summary = summarize(runs)
        if len(ttas := {flatten(r.params).get("evaluate.tta") for r in runs}) == 1:  # else the rows name theirs
            summary["tta"] = ttas.pop()
        save_json(summary, out / "sweep.json")
        save_text(sweep_table(summary), out / "sweep.md")
        sweep_png(summary, out / "sweep.png")
    return summary


def main(argv: list[str]) -> int:
    parser = one_line_errors(argparse.ArgumentParser(prog="transferkit collect",
                                                     description=__doc__.split("\n\n")[0]))
    parser.add_argument("dirs", nargs="*", type=Path, help="sweep folders (hydra.sweep.dir, sweeps/NAME, ...)")
    parser.add_argument("--out", type=Path, help="where sweep.md/.json/.png go (default DIR/collected)")
    args = parser.parse_args(argv)
    if not args.dirs:
        raise TransferkitError("collect needs a sweep folder. Fix: `transferkit collect multirun/<experiment>`.")
    out = args.out or args.dirs[0] / "collected"
    check_untracked(out, "--out" if args.out else "--out (by default DIR/collected)")
    summary = collect(args.dirs, out)
    print(sweep_table(summary))
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0
