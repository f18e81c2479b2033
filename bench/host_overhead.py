"""Per-step host overhead of our training loop against a plain PyTorch loop.

ours:  what a training stage runs: Lightning's Trainer from the cpu trainer preset (callbacks,
       resume checkpoints, learning-rate monitor, the logger), ClassifierModule, TaskDataModule;
       once as the stages run it (with the progress bar where stdout is a terminal, as there)
       and once without progress bar and logger
plain: `for x, y in batches: loss = cross_entropy(model(x), y); loss.backward(); opt.step();
       sched.step(); opt.zero_grad()`

Same tiny model (fastnet 8/16/16), same batches (DeviceBatches: gather, flip, translate), same SGD
and schedule, fp32, one thread. A step's time is the slope between a short and a long epoch, so
start-up and epoch-end work cancel out; each arm runs --repeats times, taking turns (first, second
and third in rotation, so that whatever favours a place in the order favours every arm alike), and
the median slope counts. The difference is what our loop adds per step: as the median of the
differences of slopes measured back to back (a VM whose speed drifts between repeats moves both
slopes of a pair alike), as the fastest slope of each arm against the plain loop's fastest (noise
only ever slows a run down: timeit's reasoning), and, immune to that noise, as the Python function
calls a step makes (cProfile's count, the same slope), which is where a loop's host time goes.

    uv run python bench/host_overhead.py [--batch 32] [--repeats 9]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe, finish, machine, main_of, now, table  # noqa: E402

from transferkit.data.loader import DeviceBatches, TaskDataModule  # noqa: E402
from transferkit.models import build_model  # noqa: E402
from transferkit.training.classifier import ClassifierModule  # noqa: E402
from transferkit.training.trainer import fit  # noqa: E402

# each timed fit is a Trainer of its own, and each would print where it trains between the table's lines
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)

SETTINGS = dict(lr=0.05, weight_decay=5e-4, momentum=0.9, label_smoothing=0.2, warmup_fraction=0.1)
STEPS = (40, 200)


def task(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return {"train_x": x, "train_y": y, "val_x": x[:0], "val_y": y[:0], "classes": [str(i) for i in range(10)]}


def model():
    torch.manual_seed(0)
    return build_model("fastnet", 10, widths=[8, 16, 16], stem_width=8)


def cpu_trainer() -> dict:
    from transferkit.config.compose import compose

    return dict(compose([], Path(__file__).resolve().parents[1] / "conf").trainer)


def run_ours(steps: int, batch: int, tmp: Path, bar_and_logger: bool) -> float:
    cfg = cpu_trainer()
    cfg.update(precision="32-true", num_threads=1)
    if not bar_and_logger:
        cfg.update(progress_bar=False, loggers=[])
    module = ClassifierModule(model(), **SETTINGS)
    data = TaskDataModule(task(steps * batch), batch, 256, val_split="none")
    start = time.perf_counter()
    fit(module, data, cfg, tmp / f"ours{steps}{bar_and_logger}{time.perf_counter_ns()}", max_epochs=1)
    return time.perf_counter() - start


def run_plain(steps: int, batch: int) -> float:
    torch.set_num_threads(1)
    # the kernels ours runs: the cpu preset's Trainer turns deterministic algorithms on (and leaves them on)
    torch.use_deterministic_algorithms(bool(cpu_trainer()["deterministic"]))
    net = model().to(memory_format=torch.channels_last).train()
    t = task(steps * batch)
    batches = DeviceBatches(t["train_x"], t["train_y"], batch, device="cpu", train=True, flip="random", translate=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(net(x), y, label_smoothing=0.2)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def calls_per_step(arm, tmp: Path) -> float:
    """Python function calls per step: the slope of cProfile's count between the two epoch lengths."""
    counts = []
    for n in STEPS:
        profiler = cProfile.Profile()
        profiler.runcall(arm, n, tmp)
        counts.append(pstats.Stats(profiler).total_calls)
    return (counts[1] - counts[0]) / (STEPS[1] - STEPS[0])


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median: the k-th smallest and k-th largest value, k the
    largest count with P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (none below 6 values). Slopes on
    a VM are far from normal (a stall only ever slows a run), so no mean or t interval."""
    v, n = sorted(values), len(values)
    k = max((k for k in range(1, n // 2 + 1) if sum(math.comb(n, i) for i in range(k)) / 2 ** n <= (1 - level) / 2),
            default=0)
    return (v[k - 1], v[n - k]) if k else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9, help="6 or more give the median difference a 95%% interval")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = {"when": now(), "machine": machine(), "progress_bar_drawn": sys.stdout.isatty()}
    print(describe(info["machine"]), flush=True)
    bar = ("drawn (stdout is a terminal)" if info["progress_bar_drawn"] else
           "not drawn (stdout is not a terminal; run in one to include the bar, as a stage in a terminal draws it)")
    print(f"Lightning's progress bar: {bar}", flush=True)
    arms = {"plain PyTorch loop": lambda n, tmp: run_plain(n, args.batch),
            "ours, as the stages run it": lambda n, tmp: run_ours(n, args.batch, tmp, True),
            "ours, no progress bar or logger": lambda n, tmp: run_ours(n, args.batch, tmp, False)}
    slopes: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arm in arms.items():  # warm-up: imports, first kernels
            arm(STEPS[0], Path(tmp))
        names = list(arms)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each arm in every position in turn
                short, long = (arms[name](n, Path(tmp)) for n in STEPS)
                slopes[name].append((long - short) / (STEPS[1] - STEPS[0]) * 1000)
        calls = {name: calls_per_step(arm, Path(tmp)) for name, arm in arms.items()}
    plain = slopes["plain PyTorch loop"]
    rows = []
    for name, v in slopes.items():
        over = [a - b for a, b in zip(v, plain)]  # each repeat's arms ran back to back
        ci = median_interval(over)
        rows.append({"loop": name, "ms": statistics.median(v), "spread": f"{min(v):.3f}-{max(v):.3f}",
                     "over": statistics.median(over), "over_ci": f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "",
                     "over_spread": f"{min(over):+.3f} to {max(over):+.3f}",
                     "fastest_over": min(v) - min(plain), "calls": calls[name]})
    print(f"\nms per training step (batch {args.batch}, fastnet 8/16/16, fp32, 1 thread; slope between "
          f"{STEPS[0]} and {STEPS[1]} steps, median of {args.repeats}):")
    print(table(rows, [("loop", "loop", "s"), ("ms", "ms/step", ".3f"), ("spread", "range", "s"),
                       ("over", "above plain, ms (paired)", "+.3f"), ("over_ci", "95% interval of that median", "s"),
                       ("over_spread", "range", "s"),
                       ("fastest_over", "fastest above plain's fastest, ms", "+.3f"),
                       ("calls", "Python calls/step", ",.0f")]))
    finish("host_overhead", {**info, "slopes_ms": slopes, "calls_per_step": calls}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main_of(main))
