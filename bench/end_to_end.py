"""End to end: the wall clock of every stage of `dvc repro` from a clean state.

In a fresh copy of the project (what a clone has: conf/, src/, dvc.yaml, params.yaml composed
for --experiment, data/; no artifacts, no DVC cache), each stage runs as
`dvc repro --single-item STAGE` in pipeline order and is timed from outside. For the training
stages the table splits the time into training (the stage's own timing.json) and the rest
(start-up, loading, evaluation on val, saving, DVC hashing). Baselines measured in the same run:

- `dvc repro` again in the same copy, nothing changed: what a rerun costs (DVC's checks only);
- one parameter changed (`evaluate.latency_repeats` + 1 in params.yaml): what DVC reruns, and
  how long it takes.

The machine's fp32 and bf16 matrix-multiply peaks are measured before and after (_common.machine(),
as every bench script does): shared VMs drift, and a wall clock means little without the speed it
ran at.

    uv run python bench/end_to_end.py [--experiment cifar10_split] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml
from _common import ROOT, describe, machine, now, save, table, timed

from transferkit.config.compose import compose, params_text
from transferkit.project import copy_project, stages_run


def train_seconds(proj: Path, stage: str) -> float | None:
    """A training stage's own training time; freeze_curve sums its points."""
    folder = proj / "artifacts" / stage
    files = [folder / "timing.json"] if (folder / "timing.json").exists() else sorted(folder.glob("*/timing.json"))
    values = [json.loads(f.read_text()).get("train_seconds") for f in files]
    values = [v for v in values if isinstance(v, (int, float))]
    return round(sum(values), 1) if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="cifar10_split")
    ap.add_argument("--keep", type=Path, help="run in this (new) folder and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)

    info = {"when": now(), "machine": machine(), "experiment": args.experiment}
    print(f"experiment {args.experiment}; {describe(info['machine'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="transferkit-e2e-") as tmp:
        proj = copy_project(ROOT, (args.keep or Path(tmp) / "project").resolve(),
                            params_text(compose([f"experiment={args.experiment}"], ROOT / "conf")))
        stages = list(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"])  # written in pipeline order
        rows = []
        for stage in stages:
            seconds, out = timed(["dvc", "repro", "--single-item", stage], proj)
            train = train_seconds(proj, stage)
            rows.append({"stage": stage, "wall": seconds, "train": train,
                         "rest": None if train is None else seconds - train,
                         "ran": ", ".join(stages_run(out)) or "(nothing)"})
            print(table(rows[-1:], COLUMNS), flush=True)
        total = sum(r["wall"] for r in rows)
        rows.append({"stage": "**total**", "wall": total, "train": sum(r["train"] or 0 for r in rows),
                     "rest": None, "ran": ""})

        noop, out = timed(["dvc", "repro"], proj)
        noop_ran = stages_run(out)
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["evaluate"]["latency_repeats"] += 1  # what a user's edit of one setting costs
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed, out = timed(["dvc", "repro"], proj)
        changed_ran = stages_run(out)

    print(f"\n`dvc repro` of experiment {args.experiment} from a clean copy, stage by stage "
          f"(wall seconds, measured outside the stage):")
    print(table(rows, COLUMNS))
    print(f"\nbaselines in the same copy:\n"
          f"- `dvc repro` again, nothing changed: {noop:.1f} s, ran {noop_ran or 'no stage'}\n"
          f"- `dvc repro` after evaluate.latency_repeats + 1: {changed:.1f} s, ran {changed_ran or 'no stage'}")
    info["machine_after"] = machine()
    print(f"after: {describe(info['machine_after'])}")
    path = save(f"end_to_end-{args.experiment}", {**info, "stages": rows, "total_seconds": total,
                                                   "noop_repro_seconds": noop, "noop_ran": noop_ran,
                                                   "one_param_changed_seconds": changed,
                                                   "one_param_changed_ran": changed_ran})
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


COLUMNS = [("stage", "stage", "s"), ("wall", "wall s", ".1f"), ("train", "of which training s", ".1f"),
           ("rest", "rest s", ".1f"), ("ran", "DVC ran", "s")]

if __name__ == "__main__":
    sys.exit(main())
