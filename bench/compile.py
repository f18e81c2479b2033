"""Does torch.compile pay for training on this machine? One training step of each stage's
model as the Trainer runs it (its precision on this machine, channels_last, SGD Nesterov, the stage's batch
size; bench/mfu.py's train_step_fn), eager (the baseline, what the stages run) vs under
torch.compile (inductor, default mode), in the same run: images/s, seconds to compile (the
first step), and how many steps it takes to win that time back (none: never).

    uv run python bench/compile.py [--window 3] [--artifacts artifacts]

Prints a table and writes bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, describe, finish, fresh_inductor_cache, load_target_task, machine, main_of, now, params, table  # noqa: E402
from mfu import TRAIN, best_rate, stage_models, train_step_fn  # noqa: E402

COLUMNS = [("stage", "training step", "s"), ("batch", "batch", "d"), ("eager_img_s", "eager img/s", ",.0f"),
           ("compiled_img_s", "torch.compile img/s", ",.0f"), ("ratio", "compiled / eager", ".2f"),
           ("compile_s", "compile s", ".1f"), ("break_even_steps", "steps to break even (blank: never)", ",.0f"),
           ("stage_steps", "steps in the stage", ",d")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=3.0, help="seconds per timing window (best of 3)")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    args = ap.parse_args(argv)
    fresh_inductor_cache()
    p = params()
    info = {"when": now(), "machine": machine(), "precision": TRAIN}
    print(describe(info["machine"]), flush=True)
    task, _ = load_target_task(args.artifacts)
    n_classes, n_train = len(task["classes"]), len(task["train_y"])
    models = {k: m for k, (m, _) in stage_models(p, args.artifacts, n_classes).items()}
    runs = [("transfer", "teacher"), ("distill", "student"), ("prune", "pruned")]  # pretrain: the teacher too
    rows = []
    for stage, name in runs:
        batch = p[stage]["batch_size"]
        # distill and prune's recovery run the frozen teacher's forward too, eagerly: in both arms
        teacher = models["teacher"] if stage in ("distill", "prune") else None
        eager, _ = best_rate(train_step_fn(copy.deepcopy(models[name]), batch, n_classes, teacher), batch, args.window)
        torch._dynamo.reset()
        step = train_step_fn(torch.compile(copy.deepcopy(models[name])), batch, n_classes, teacher)
        t = time.perf_counter()
        step()  # compiles forward and backward
        compile_s = time.perf_counter() - t
        compiled, _ = best_rate(step, batch, args.window)
        saved = batch / eager - batch / compiled  # seconds per step
        label = f"{stage} ({name}{' + teacher fwd' if teacher is not None else ''})"
        rows.append({"stage": label, "batch": batch, "eager_img_s": eager, "compiled_img_s": compiled,
                     "ratio": compiled / eager, "compile_s": compile_s,
                     "break_even_steps": compile_s / saved if saved > 0 else None,
                     "stage_steps": p[stage]["epochs"] * (n_train // batch)})
        print(table(rows[-1:], COLUMNS), flush=True)
    print(f"\ntraining step, eager vs torch.compile ({TRAIN}, channels_last):")
    print(table(rows, COLUMNS))
    finish("compile", info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_of(main))
