"""The published airbench94 trainer on this project's CIFAR-10: the yardstick for
experiment=cifar10_full, on the very images the pipeline trains and tests on.

    python bench/airbench_reference.py AIRBENCH94_PY --task artifacts/prepare/source.pt [--runs 3]

AIRBENCH94_PY is legacy/airbench94.py of github.com/KellerJordan/cifar10-airbench; it is not part
of this project (get it from there) and needs a CUDA device. The prepared task (all ten CIFAR-10
classes: experiment=cifar10_full's source.pt) is written as the cifar10/{train,test}.pt files
airbench94 caches, in a temporary folder; its main() then runs once on random labels (its own
warm-up) and --runs times for real. Prints each run's test accuracy with airbench's
test-time augmentation and the wall seconds of the run (airbench's own timer, printed in its
table, leaves out its per-epoch evaluation).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_airbench_files(task: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        torch.save({"images": task[f"{split}_x"].permute(0, 2, 3, 1).contiguous(),  # NHWC uint8, as airbench caches
                    "labels": task[f"{split}_y"], "classes": list(task["classes"])}, folder / f"{split}.pt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("airbench", type=Path, help="path to airbench94.py")
    ap.add_argument("--task", type=Path, required=True, help="a prepared task with all ten CIFAR-10 classes")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/airbench_reference.py: airbench94 needs a CUDA device; none here, nothing measured.")
        return 0
    task = torch.load(args.task, map_location="cpu", weights_only=True)
    if len(task["classes"]) != 10 or len(task["train_y"]) < 50_000:
        sys.exit(f"{args.task} is not all of CIFAR-10 ({len(task['classes'])} classes, {len(task['train_y'])} "
                 f"train images). Fix: prepare experiment=cifar10_full and pass its source.pt.")
    spec = importlib.util.spec_from_file_location("airbench94", args.airbench.resolve())
    airbench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(airbench)
    accuracies, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        write_airbench_files(task, Path(tmp) / "cifar10")
        airbench.print_columns(airbench.logging_columns_list, is_head=True)
        airbench.main("warmup")
        for run in range(args.runs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            accuracies.append(float(airbench.main(run)))
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    print(f"\nairbench94 on {args.task} ({len(task['train_y'])} train / {len(task['test_y'])} test images), "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}:")
    for run, (acc, sec) in enumerate(zip(accuracies, seconds)):
        print(f"  run {run}: test top-1 with TTA {acc:.4f}, {sec:.1f} s wall (with per-epoch evaluation)")
    print(f"  mean {statistics.fmean(accuracies):.4f} over {len(accuracies)} runs; pid {os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
