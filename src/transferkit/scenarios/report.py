"""`transferkit scenarios [--out DIR] [--only NAME,...] [--early-depth K] [--partial-depth K] [--dry] [key=value ...]`:
the four scenarios (target data small or large x source similar or different, one preset each in
conf/experiment/scenario_*.yaml) as one DVC pipeline in DIR, scored into DIR/scenarios.md and
scenarios.json (docs/sweeps.md). key=value overrides apply to every quadrant (seed=1, model=vgg_mini).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

from transferkit.config.compose import compose, params_text, to_params
from transferkit.config.dvcyaml import code_files, tracked_params
from transferkit.config.checks import check_frozen_sweep, validate_run
from transferkit.config.overrides import as_override, override_key
from transferkit.errors import TransferkitError, one_line_errors
from transferkit.evaluation import SCORED_WITH
from transferkit.evaluation.scenarios import score_quadrant
from transferkit.evaluation.tables import scenarios_markdown
from transferkit.io import save_json, save_text
from transferkit.plain import differing, flatten, under
from transferkit.project import (WHY_LOCKED, ReproFailed, check_runs_folder, out_paths, run_pipeline, stage_run,
                                 stale_stages)
from transferkit.stages import BY_NAME
from transferkit.stages.common import exclusive
from transferkit.sweep.points import check_points, expand, pin_named_files

# preset -> (target size, source similarity), in the order of the report
QUADRANTS = {"scenario_small_similar": ("small", "similar"), "scenario_small_different": ("small", "different"),
             "scenario_large_similar": ("large", "similar"), "scenario_large_different": ("large", "different")}
SHARED_BY_SOURCE = ("seed", "model", "pretrain", "data.source", "data.image_size")  # what pretraining reads
OUT = Path("scenarios")  # --out's default, which the report's "Made by" line leaves out


class Strategy(NamedTuple):
    name: str        # output folder
    label: str
    stage: str       # the pipeline stage that trains it
    overrides: dict  # on top of the quadrant's config
    what: str        # what is trained, for the report
    option: str = ""  # the command-line option that sets its depth, if one does

    def sets(self) -> list[str]:
        return [f"{k}={'null' if v is None else v}" for k, v in self.overrides.items()]


def strategies(early: int = 2, partial: int = 2) -> list[Strategy]:
    return [Strategy("linear_probe", "linear probe", "probe", {"probe.depth": None},
                     "new head on all pretrained blocks (frozen)"),
            Strategy("early_probe", f"probe on block {early}", "probe", {"probe.depth": early},
                     f"new head on pretrained blocks[:{early}] (frozen)", "--early-depth"),
            Strategy("partial_freeze", f"partial freeze ({partial})", "transfer", {"transfer.freeze_depth": partial},
                     f"pretrained blocks[:{partial}] frozen, the rest fine-tuned", "--partial-depth"),
            Strategy("fine_tune", "full fine-tune", "transfer", {"transfer.freeze_depth": 0},
                     "every pretrained block fine-tuned"),
            Strategy("scratch", "scratch", "scratch", {}, "every block from random init")]


def pipeline(out: Path, overrides: list[str], plan: list[Strategy], find_data: bool = False) -> dict:
    """Compose and check every quadrant and strategy (a bad override fails in a second, before
    anything trains), write each quadrant's params file and return the DVC stages. `find_data`: each CIFAR
    dataset is found (or downloaded, as data.download allows) first, as its prepare would, or prepare's error."""
    from transferkit.data.cifar import CIFAR  # here, as models in depth_error: importing this module needs no torch
    from transferkit.data.resolve import dataset_location, locate

    if bad := [o for o in overrides if override_key(o).startswith("hydra") or
               override_key(o) in ("experiment", "name", "paths.artifacts_dir")]:
        raise TransferkitError(f"override '{bad[0]}' cannot be used here: each quadrant sets its experiment and "
                               f"folders. Fix: use --only NAME,... and --out DIR.")
    # each strategy sets its own depth: an override of it would be replaced, unseen, by the strategy's value
    options = {k: s.option for s in plan if s.option for k in s.overrides}
    if bad := [o for o in overrides if override_key(o) in options]:
        raise TransferkitError(f"override '{bad[0]}' cannot be used here: each strategy sets "
                               f"{override_key(bad[0])} itself. Fix: use {options[override_key(bad[0])]} K.")
    if len(expand(overrides)) > 1:
        raise TransferkitError(f"{' '.join(overrides)}: a sweep of scenarios is one run per setting. Fix: give one "
                               f"value per key and a separate --out DIR per run.")
    design = quadrant_data()
    stages, sources, blocks, params_files, wanted = {}, {}, {}, {}, set()
    code = {stage: code_files(BY_NAME[stage]) for stage in {"prepare", "pretrain", *(s.stage for s in plan)}}
    for preset, (_, similarity) in QUADRANTS.items():
        try:  # each quadrant's stages read its own folders, not paths.artifacts_dir
            cfg = check_points(None, [f"experiment={preset}", *overrides], blocks)[0][1]
        except TransferkitError as e:
            raise TransferkitError(f"{preset}: {e}") from e
        composed = flatten(to_params(cfg))
        if changed := [k for k, v in design[preset].items() if composed.get(k) != v]:
            k = changed[0]
            by = [o for o in overrides if under(k, [override_key(o)]) or under(override_key(o), [k])] or overrides
            raise TransferkitError(f"{' '.join(by)} sets {k}, which sets the quadrants apart ({preset} has "
                                   f"{k}={as_override(design[preset][k])}): the report would compare quadrants that "
                                   f"do not differ in it. Fix: leave it out, or change the quadrants in "
                                   f"conf/experiment/scenario_*.yaml.")
        runs = {}  # each strategy's settings are plain values: set on the composed quadrant, not composed again
        for s in plan:
            if s.option and (error := depth_error(preset, cfg, s)):  # named by the option
                raise error
            runs[s.name] = OmegaConf.merge(cfg, OmegaConf.from_dotlist(s.sets()))
            try:
                validate_run(runs[s.name], s.stage, blocks)
            except TransferkitError as e:
                raise TransferkitError(f"{preset}, strategy {s.name}: {e}") from e
        check_frozen_sweep([runs[s.name] for s in plan if s.stage == "transfer"])  # depths alone set them apart
        if "trainer.progress_bar" not in map(override_key, overrides):
            cfg.trainer.progress_bar = False
        # the keys of the quadrant's params file DVC watches per stage, as dvc.yaml's (the data folder is a dep)
        keys = {stage: [k for k in tracked_params(BY_NAME[stage].params, list(cfg.trainer)) if k != "paths.data_dir"]
                for stage in code}
        cfg.paths.data_dir = data_dir = str(Path(cfg.paths.data_dir).resolve())
        if not Path(data_dir).is_dir():  # before any params file is written
            raise TransferkitError(f"{data_dir} does not exist, and prepare reads the datasets there "
                                   f"(paths.data_dir). Fix: run from the project's folder (where data/ is), or set "
                                   f"paths.data_dir to the folder that holds them.")
        if out.resolve().is_relative_to(data_dir):  # each prepare reads data_dir whole: its outputs would be in it
            raise TransferkitError(f"--out {out} is inside the data folder {data_dir} (paths.data_dir), which each "
                                   f"quadrant's prepare reads whole. Fix: pass --out a folder outside it.")
        datasets = pin_named_files("prepare", cfg)  # outside data_dir: deps of their own
        wanted.update((d, data_dir, cfg.data.download) for d in (cfg.data.source.dataset, cfg.data.target.dataset))
        first = sources.setdefault(similarity, (preset, cfg))
        if any(OmegaConf.select(first[1], k) != OmegaConf.select(cfg, k) for k in SHARED_BY_SOURCE):
            raise TransferkitError(f"{preset} and {first[0]} have the same source but other pretraining settings: "
                                   f"they cannot share one pretraining. Fix: override only what both may share.")
        params, prepared = f"params/{preset}.yaml", {"prepare": f"{preset}/prepare"}
        params_files[out / params] = params_text(cfg)  # written once every quadrant is checked
        stages[f"{preset}-prepare"] = stage_run("prepare", params, f"{preset}/prepare", {},
                                                [data_dir, *datasets, *code["prepare"]], keys["prepare"])
        if first[0] == preset:
            stages[f"{similarity}-pretrain"] = stage_run("pretrain", params, f"pretrain-{similarity}", prepared,
                                                         code["pretrain"], keys["pretrain"])
        for s in plan:  # each reads what its stage reads: scratch is no rerun when only pretraining changes
            inputs = {k: v for k, v in {**prepared, "pretrain": f"pretrain-{similarity}"}.items()
                      if k in BY_NAME[s.stage].reads}
            stages[f"{preset}-{s.name}"] = stage_run(s.stage, params, f"{preset}/{s.name}", inputs, code[s.stage],
                                                     [*keys[s.stage], *SCORED_WITH], s.sets())  # as it is scored
    # each CIFAR dataset found (or downloaded) now: prepare's one error, not one per quadrant amid DVC's output
    for dataset, data_dir, download in sorted(wanted) if find_data else []:
        if dataset in CIFAR and dataset_location(dataset, Path(data_dir)) is None:
            locate(dataset, Path(data_dir), download=download)
    for path, text in params_files.items():
        save_text(text, path)
    return stages


def quadrant_data() -> dict[str, dict]:
    """Each quadrant's data settings that differ between quadrants (target size, source classes): the design,
    which no override may change."""
    data = {preset: {k: v for k, v in flatten(to_params(compose([f"experiment={preset}"]))).items()
                     if under(k, ["data"])} for preset in QUADRANTS}
    first = next(iter(data.values()))
    keys = {k for d in data.values() for k in differing(first, d)}
    return {preset: {k: d.get(k) for k in keys} for preset, d in data.items()}


def depth_error(preset: str, cfg: DictConfig, s: Strategy) -> TransferkitError | None:
    """A strategy's depth out of its model's range, or one that makes it another strategy (0 blocks frozen:
    fine_tune; all of them probed: linear_probe, or frozen: no fine-tuning left), named by the option that set it."""
    from transferkit.models import model_from_config

    n = model_from_config(to_params(cfg.model), 2, key="model", fetch_weights=False).num_blocks
    if isinstance(depth := next(iter(s.overrides.values())), int) and 0 < depth < n:
        return None
    return TransferkitError(f"{s.option} {depth} is out of range: model '{cfg.model.name}' has {n} blocks ({preset}, "
                            f"strategy {s.name}), and depths 0 and {n} are other strategies' (full fine-tune, linear "
                            f"probe). Fix: {s.option} K with K in 1..{n - 1}.")


def run(out: Path, only: list[str] | None = None, overrides: list[str] | None = None,
        early_depth: int = 2, partial_depth: int = 2, dry: bool = False) -> dict:
    named = {o if o in QUADRANTS else f"scenario_{o}": o for o in only or []}
    if unknown := [o for name, o in named.items() if name not in QUADRANTS]:
        raise TransferkitError(f"unknown scenario '{unknown[0]}'. Fix: use one of {', '.join(QUADRANTS)} "
                               f"(or without the scenario_ prefix).")
    chosen, plan = [p for p in QUADRANTS if not named or p in named], strategies(early_depth, partial_depth)
    check_runs_folder(out, "scenarios")  # before anything is composed or locked
    with exclusive(out, WHY_LOCKED):  # from its params files to the report of the runs its dvc.yaml lists
        stages = pipeline(out, list(overrides or []), plan, find_data=True)
        start, targets = time.perf_counter(), [name for name in stages if name.split("-")[0] in chosen]
        if dry:
            run_pipeline(out, stages, targets, by="scenarios", dry=True)
            for name in (would := would_run(out, stages, targets)):
                print(f"would run {name}")
            print(f"transferkit scenarios --dry: {len(would)} stage{'s' * (len(would) != 1)} of {out} would run, and "
                  f"none ran{' (without --dry, the command runs them)' * bool(would)}.")
            return {"would_run": would}
        try:
            ran = run_pipeline(out, stages, targets, by="scenarios")
        except ReproFailed:  # the other quadrants ran (--keep-going): the report of those that finished, then the
            try:  # failure; none finished: the earlier report stays as it was
                if finished := finished_quadrants(out, []):
                    report(out, finished, plan, overrides, early_depth, partial_depth)
                    (out / "scenarios_timing.json").unlink(missing_ok=True)  # which stages ran is DVC's to say
                    show(out, "of the quadrants that finished")
            except Exception as e:  # a courtesy: the failure is the error to report
                print(f"transferkit scenarios: no report of the quadrants that finished: {e}", file=sys.stderr)
            raise
        if named:  # the quadrants an earlier run finished, with these settings and code, stay in the report
            chosen = finished_quadrants(out, chosen)
        summary = report(out, chosen, plan, overrides, early_depth, partial_depth)
        save_json({"this_run_seconds": round(time.perf_counter() - start, 1), "stages_run": ran},
                  out / "scenarios_timing.json")
    return summary


def would_run(out: Path, stages: dict, targets: list[str]) -> list[str]:
    """The stages `dvc repro TARGETS` would run in `out` (`dvc repro --dry` fails where a stage reads files not made
    yet): those out of date among the targets and the stages they read (the other quadrant's prepare, where a shared
    pretraining reads it), and each of those that reads one of them."""
    maker = {o: name for name, stage in stages.items() for o in out_paths(stage)}
    reads = {name: {maker[o] for d in stage["deps"] for o in maker if d == o or d.startswith(f"{o}/")}
             for name, stage in stages.items()}
    needed, todo = set(), list(targets)
    while todo:
        if (name := todo.pop()) not in needed:
            needed.add(name)
            todo += reads[name]
    stale, runs = set(stale_stages(out)), []
    for name in stages:  # pipeline() lists each stage after the stages it reads
        if name in needed and (name in stale or reads[name] & set(runs)):
            runs.append(name)
    return runs


def finished_quadrants(out: Path, chosen: list[str]) -> list[str]:
    """`chosen` (just run) and the quadrants whose stages, and their pretraining's, are up to date in `out`."""
    stale = {name.split("-")[0] for name in stale_stages(out)}
    return [p for p in QUADRANTS if p in chosen or not stale & {p, QUADRANTS[p][1]}]


def report(out: Path, chosen: list[str], plan: list[Strategy], overrides: list[str] | None, early_depth: int,
           partial_depth: int) -> dict:
    """Scores the `chosen` quadrants into out/scenarios.json and scenarios.md, which opens with the command that
    makes it again."""
    results = [score_quadrant(out, preset, *QUADRANTS[preset], plan) for preset in chosen]
    summary = {"quadrants": results, "overrides": list(overrides or []),
               "strategies": [{"name": s.name, "label": s.label, "stage": s.stage, "overrides": s.overrides}
                              for s in plan]}
    save_json(summary, out / "scenarios.json")
    short = [p.removeprefix("scenario_") for p in chosen]
    only = ["--only", ",".join(short)] if len(chosen) < len(QUADRANTS) else []
    made_by = " ".join(["transferkit scenarios", *(["--out", shlex.quote(str(out))] if out != OUT else []), *only,
                        f"--early-depth {early_depth} --partial-depth {partial_depth}",
                        *map(shlex.quote, overrides or [])])
    save_text(scenarios_markdown(results, made_by), out / "scenarios.md")
    return summary


def show(out: Path, what: str = "") -> None:
    """The report on the console, and the files that hold it."""
    print((out / "scenarios.md").read_text())
    written = [out / f for f in ("scenarios.md", "scenarios.json", "scenarios_timing.json") if (out / f).is_file()]
    print(f"wrote {', '.join(map(str, written))}{f' {what}' * bool(what)}")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the key=value overrides (the other arguments, in argv's order; a key given twice is refused)."""
    parser = one_line_errors(argparse.ArgumentParser(prog="transferkit scenarios",
                                                     description=__doc__.split("\n\n")[0]))
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT}/)")
    parser.add_argument("--only", action="extend", type=lambda names: names.split(","), default=[], metavar="NAME,...",
                        help=f"run only these of {', '.join(QUADRANTS)}")
    parser.add_argument("--early-depth", type=int, default=2, help="probe.depth of the earlier-block probe (2)")
    parser.add_argument("--partial-depth", type=int, default=2, help="transfer.freeze_depth of partial freeze (2)")
    parser.add_argument("--dry", action="store_true", help="name the stages a run would run, and run none")
    args, rest = parser.parse_known_args(argv)
    if "" in args.only:  # `--only a,,b`, `--only ""`: no name
        names = ", ".join(q.removeprefix("scenario_") for q in QUADRANTS)
        parser.error(f"--only {','.join(args.only)!r} lists an empty name (it takes NAME,NAME of {names})")
    if bad := [a for a in rest if "=" not in a or a.startswith("-")] + [n for n in args.only if "=" in n]:
        parser.error(f"unrecognized arguments: {' '.join(map(repr, bad))} (--only takes NAME,NAME; the rest is "
                     f"key=value overrides)")
    return args, rest


def main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    run(args.out, args.only, overrides, args.early_depth, args.partial_depth, args.dry)
    if not args.dry:
        show(args.out)
    return 0
