"""End to end: the wall clock of every stage of `dvc repro` from a clean state.

In a fresh copy of the project (what a clone has: conf/, src/, dvc.yaml, params.yaml composed
for --experiment, data/; no artifacts, no DVC cache), each stage runs as
`dvc repro --single-item STAGE` in pipeline order and is timed from outside. For the training
stages the table splits the time into training (the stage's own timing.json) and the rest
(start-up, loading, evaluation on val, saving, DVC hashing). Baselines measured in the same run:

- `dvc repro` again in the same copy, nothing changed: what a rerun costs (DVC's checks only);
- one parameter changed (`evaluate.latency_repeats` + 1 in params.yaml): what DVC reruns, and
  how long it takes.

With --warm, the same stages again in a second fresh copy with TRANSFERKIT_WARM=1 (each stage a
worker forked from a server that imported torch and Lightning once; the first stage starts the
server and runs as a fresh process while it imports), and the two side by side.

The machine's fp32 and bf16 matrix-multiply peaks are measured before and after (_common.machine(),
as every bench script does): shared VMs drift, and a wall clock means little without the speed it
ran at.

    uv run python bench/end_to_end.py [--experiment cifar10_split] [--keep DIR] [--warm]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml
from _common import ROOT, describe, machine, main_of, now, save, table, timed, warm_commands

from transferkit.config.compose import compose, params_text
from transferkit.project import copy_project, stages_run


def train_seconds(proj: Path, stage: str) -> float | None:
    """A training stage's own training time; freeze_curve sums its points."""
    folder = proj / "artifacts" / stage
    files = [folder / "timing.json"] if (folder / "timing.json").exists() else sorted(folder.glob("*/timing.json"))
    values = [json.loads(f.read_text()).get("train_seconds") for f in files]
    values = [v for v in values if isinstance(v, (int, float))]
    return round(sum(values), 1) if values else None


def stage_by_stage(proj: Path) -> list[dict]:
    """`dvc repro --single-item STAGE` for each stage in pipeline order, timed; a total row last."""
    rows = []
    for stage in yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]:  # written in pipeline order
        seconds, out = timed(["dvc", "repro", "--single-item", stage], proj)
        train = train_seconds(proj, stage)
        rows.append({"stage": stage, "wall": seconds, "train": train,
                     "rest": None if train is None else seconds - train,
                     "ran": ", ".join(stages_run(out)) or "(nothing)"})
        print(table(rows[-1:], COLUMNS), flush=True)
    rows.append({"stage": "**total**", "wall": sum(r["wall"] for r in rows),
                 "train": sum(r["train"] or 0 for r in rows), "rest": None, "ran": ""})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="cifar10_split")
    ap.add_argument("--keep", type=Path, help="run in this (new) folder and keep it (default: a temporary folder)")
    ap.add_argument("--warm", action="store_true", help="then the same stages with TRANSFERKIT_WARM=1, side by side")
    args = ap.parse_args(argv)
    if args.keep and args.keep.exists():
        ap.error(f"--keep {args.keep} exists: the run copies the project into a new folder. Fix: name a new "
                 f"folder, or delete that one")
    composed = params_text(compose([f"experiment={args.experiment}"], ROOT / "conf"))  # before the peaks' seconds

    info = {"when": now(), "machine": machine(), "experiment": args.experiment}
    print(f"experiment {args.experiment}; {describe(info['machine'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="transferkit-e2e-") as tmp:
        proj = copy_project(ROOT, (args.keep or Path(tmp) / "project").resolve(), composed)
        rows = stage_by_stage(proj)
        total = rows[-1]["wall"]

        noop, out = timed(["dvc", "repro"], proj)
        noop_ran = stages_run(out)
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["evaluate"]["latency_repeats"] += 1  # what a user's edit of one setting costs
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed, out = timed(["dvc", "repro"], proj)
        changed_ran = stages_run(out)
        warm_rows = []
        if args.warm:
            warm_proj = copy_project(ROOT, Path(tmp) / "warm", composed)
            with warm_commands(Path(tmp) / "w", idle=60):
                warm_rows = stage_by_stage(warm_proj)

    print(f"\n`dvc repro` of experiment {args.experiment} from a clean copy, stage by stage "
          f"(wall seconds, measured outside the stage):")
    print(table(rows, COLUMNS))
    print(f"\nbaselines in the same copy:\n"
          f"- `dvc repro` again, nothing changed: {noop:.1f} s, ran {noop_ran or 'no stage'}\n"
          f"- `dvc repro` after evaluate.latency_repeats + 1: {changed:.1f} s, ran {changed_ran or 'no stage'}")
    if warm_rows:
        both = [{"stage": a["stage"], "fresh": a["wall"], "warm": b["wall"], "saved": a["wall"] - b["wall"],
                 "fresh_train": a["train"], "warm_train": b["train"]} for a, b in zip(rows, warm_rows)]
        print("\nThe same stages in a second fresh copy with TRANSFERKIT_WARM=1 (the first stage starts the server):")
        print(table(both, WARM_COLUMNS))
    info["machine_after"] = machine()
    print(f"after: {describe(info['machine_after'])}")
    path = save(f"end_to_end-{args.experiment}", {**info, "stages": rows, "total_seconds": total,
                                                   "warm_stages": warm_rows,
                                                   "noop_repro_seconds": noop, "noop_ran": noop_ran,
                                                   "one_param_changed_seconds": changed,
                                                   "one_param_changed_ran": changed_ran})
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


COLUMNS = [("stage", "stage", "s"), ("wall", "wall s", ".1f"), ("train", "of which training s", ".1f"),
           ("rest", "rest s", ".1f"), ("ran", "DVC ran", "s")]
WARM_COLUMNS = [("stage", "stage", "s"), ("fresh", "fresh processes s", ".1f"), ("warm", "TRANSFERKIT_WARM=1 s", ".1f"),
                ("saved", "saved s", ".1f"), ("fresh_train", "training s (fresh)", ".1f"),
                ("warm_train", "training s (warm)", ".1f")]

if __name__ == "__main__":
    sys.exit(main_of(main))
