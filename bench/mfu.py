"""Model-FLOPs utilisation of every training stage's model on this machine.

1. Peak: the best FLOP/s of large torch.matmul calls in fp32 (and bf16 where the stages train
   in it), and of the same GEMMs run as 1x1 convolutions (fp32 torch.matmul goes to MKL and
   convolutions to oneDNN, whose speeds differ by CPU: the peak is the faster of the two); with
   all torch threads, and one core's best x threads (the larger is used: on a shared machine the
   all-threads run understates the cores). Measured in the same run, so the ratio does not
   depend on a spec sheet or clock speed.
2. For each stage's model (params.yaml's model for pretrain/transfer, distill.student for
   distill, the pruned student for prune; loaded from artifacts/*/model.pt when
   present): training-step throughput (forward + backward + SGD step in the stages' precision
   on this machine: bf16 autocast where `trainer.precision: auto` picks it, else fp32;
   channels_last; the stage's batch size from params.yaml) and inference throughput at
   evaluate.throughput_batch (channels_last; fp32 as `evaluate` runs it, and bf16 where the
   stages train in it).
3. Achieved FLOP/s = MACs x 2 x 3 (training: forward + backward, which is about twice the
   forward) or x 2 (inference) per image x images/s, with MACs from
   transferkit.evaluation.cost.count_macs (convolutions and linear layers, what `evaluate`
   reports); MFU = achieved / measured peak of the same dtype.
4. The student pruned to any channel count vs to multiples of prune.round_to: what rounding
   the channel counts buys in speed and MFU.
5. Where the training step's time goes (torch.profiler, by op kind) and each convolution of
   the teacher alone: the evidence for what bounds MFU.

    uv run python bench/mfu.py [--window 3] [--artifacts artifacts]

Prints tables and writes bench/results/mfu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop chatter out of the tables
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, conv_widths, describe, load_target_task, machine, main_of, now, params,  # noqa: E402
                     prune_like_the_stage, save, table, train_bf16)

from transferkit.evaluation.cost import count_macs, count_params  # noqa: E402
from transferkit.models import load_checkpoint, model_from_config  # noqa: E402

TRAIN = "bf16" if train_bf16() else "fp32"  # what the stages train in on this machine


# ------------------------------------------------------------------ timing
def best_rate(fn, items_per_call: int, window: float, windows: int = 3, warmup: int = 2) -> tuple[float, list[float]]:
    """Best items/s over `windows` windows of about `window` seconds each (the least disturbed:
    other processes on the machine only ever slow a window down)."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= window:
                break
        rates.append(n * items_per_call / dt)
    return max(rates), rates


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and the library's kernel choice)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> dict:
    """Best FLOP/s of square torch.matmul at a few sizes, and of the same GEMM run as a 1x1
    convolution (oneDNN, the library every conv here runs on; fp32 torch.matmul goes to MKL,
    which on AMD CPUs can be much slower than oneDNN, so matmul alone understates the peak)."""
    per_size, conv = {}, {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        per_size[n] = 2 * n ** 3 / _best_seconds(lambda: torch.matmul(a, b), repeats)
        # [n x n] @ [n x n] as a 1x1 conv: n "pixels" (16 images of n/16 pixels), n -> n channels
        x = torch.randn(16, n, 1, n // 16).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1).to(dtype).contiguous(memory_format=torch.channels_last)
        conv[n] = 2 * n ** 3 / _best_seconds(lambda: F.conv2d(x, w), repeats)
    best = max(*per_size.values(), *conv.values())
    return {"flops": best, "per_size": per_size, "conv1x1_per_size": conv}


def machine_peak(dtype: torch.dtype) -> dict:
    """The peak with all torch threads, and one core's peak x threads: on a shared machine a
    multi-threaded run waits for whichever thread the OS has descheduled, so the first can
    understate what the cores can do; the larger of the two is used."""
    threads = torch.get_num_threads()
    full = matmul_peak(dtype)
    if threads == 1:
        return {**full, "all_threads": full["flops"], "one_core_x_threads": full["flops"]}
    torch.set_num_threads(1)
    try:
        one = matmul_peak(dtype, sizes=(1024, 2048))
    finally:
        torch.set_num_threads(threads)
    scaled = one["flops"] * threads
    return {**full, "flops": max(full["flops"], scaled), "all_threads": full["flops"], "one_core_x_threads": scaled,
            "one_core": one}


# ------------------------------------------------------------------ models
def stage_models(p: dict, artifacts: Path, num_classes: int) -> dict[str, tuple[nn.Module, str]]:
    def load(stage: str):
        path = artifacts / stage / "model.pt"
        if path.exists():
            model, _ = load_checkpoint(path, stage)
            return model, f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        return None

    teacher = load("transfer") or load("pretrain")
    if teacher is None or teacher[0].num_classes != num_classes:
        teacher = (model_from_config(p["model"], num_classes), "built from params.yaml model (random init)")
    student = load("distill") or load("student") or (
        model_from_config(p["distill"]["student"], num_classes), "built from params.yaml distill.student (random init)")
    pruned = load("prune")
    if pruned is None:
        # the layer widths do not depend on the weights: the same shapes as the real stage
        model = copy.deepcopy(student[0])
        pr = p["prune"]
        prune_like_the_stage(model, pr)
        pruned = (model, f"pruned here from the student (prune.ratio={pr['ratio']}, {pr['target']}, "
                         f"round_to={pr.get('round_to')}): "
                         f"the stage's layer widths, not its weights")
    return {"teacher": teacher, "student": student, "pruned": pruned}


def train_step_fn(model: nn.Module, batch: int, num_classes: int, teacher: nn.Module | None = None):
    """One training step as the Trainer runs it (its precision here, channels_last, SGD Nesterov);
    with `teacher`: also the frozen teacher's forward pass (the distill / prune recovery step)."""
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    if teacher is not None:
        teacher = teacher.to(memory_format=torch.channels_last).eval()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=TRAIN == "bf16"):
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                loss = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
            else:
                loss = F.cross_entropy(logits, y, label_smoothing=0.2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model: nn.Module, batch: int, bf16: bool):
    """bf16 autocast, or fp32 as `evaluate` runs it; channels_last either way (transferkit/layout.py;
    bench/inference.py compares the layouts)."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run():
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
        else:
            model(x)

    return run


# ------------------------------------------------------------------ where the time goes
KINDS = [  # (kind, regex on aten op names), first match wins
    ("conv backward", r"convolution_backward"),
    ("conv forward", r"convolution|conv2d|mkldnn_conv"),
    ("linear / matmul", r"addmm|^aten::mm$|matmul|linear"),
    ("batchnorm", r"batch_norm"),
    ("gelu", r"gelu"),
    ("max-pool", r"max_pool"),
    ("bf16 casts / copies", r"_to_copy|^aten::copy_$|^aten::to$|contiguous|clone"),
    ("optimizer (SGD)", r"_foreach|sgd"),
    ("loss / softmax", r"softmax|cross_entropy|nll_loss|kl_div"),
]


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines to fd 2 whatever the log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def time_by_kind(step, steps: int = 6) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    step()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by_kind: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        kind = next((k for k, rx in KINDS if re.search(rx, ev.key)), "other elementwise / autograd")
        by_kind[kind] += ev.self_cpu_time_total
    total = sum(by_kind.values())
    return {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}


def conv_layers(model: nn.Module, batch: int, window: float, peak: float) -> list[dict]:
    """Each convolution alone, forward, in the training precision, channels_last, at its real input shape."""
    shapes = {}

    def record(name):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            shapes[name] = (inputs[0].shape, output.shape)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.rand(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    rows = []
    modules = dict(model.named_modules())
    for name, (ishape, oshape) in shapes.items():
        conv = copy.deepcopy(modules[name]).to(memory_format=torch.channels_last)
        x = torch.rand(ishape).contiguous(memory_format=torch.channels_last)
        macs = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1] * oshape[1:].numel()

        @torch.inference_mode()
        def run(conv=conv, x=x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=TRAIN == "bf16"):
                conv(x)

        xg = x.clone().requires_grad_(name != "blocks.0.0")  # the stem's input needs no gradient

        def train(conv=conv, x=xg):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=TRAIN == "bf16"):
                out = conv(x)
            out.backward(torch.ones_like(out))
            conv.weight.grad = None

        rate, _ = best_rate(run, batch, window / 3, windows=2)
        train_rate, _ = best_rate(train, batch, window / 3, windows=2)
        train_flops = macs * 2 * (3 if xg.requires_grad else 2)  # forward, grad of weight, grad of input
        rows.append({"layer": name, "shape": f"{conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} "
                                              f"@{ishape[-1]}x{ishape[-2]}",
                     "mmacs": macs / 1e6, "gflops": rate * macs * 2 / 1e9, "mfu": rate * macs * 2 / peak,
                     "train_gflops": train_rate * train_flops / 1e9, "train_mfu": train_rate * train_flops / peak,
                     "flop_per_byte": macs * 2 * batch / ((ishape.numel() + oshape.numel() + conv.weight.numel())
                                                          * (2 if TRAIN == "bf16" else 4))})
    return rows


def rounding_rows(p: dict, student: nn.Module, teacher: nn.Module, num_classes: int, window: float,
                  peaks: dict[str, float]) -> list[dict]:
    """The student pruned at prune.ratio twice, to any channel count and to multiples of
    prune.round_to (16 if unset): MACs, training-step and fp32 inference throughput, MFU.
    oneDNN's convolution kernels work on blocks of 16 channels, so the rounded widths should
    turn more of their MACs into speed."""
    pr = p["prune"]
    batch, ev_batch = pr["batch_size"], p["evaluate"]["throughput_batch"]
    rows = []
    for round_to in (None, pr.get("round_to") or 16):
        model = copy.deepcopy(student)
        used = prune_like_the_stage(model, pr, round_to=round_to)["round_to"]
        macs, tmacs = count_macs(copy.deepcopy(model)), count_macs(copy.deepcopy(teacher))
        alone, _ = best_rate(train_step_fn(copy.deepcopy(model), batch, num_classes), batch, window)
        with_t, _ = best_rate(train_step_fn(copy.deepcopy(model), batch, num_classes, copy.deepcopy(teacher)),
                              batch, window)
        infer, _ = best_rate(infer_fn(copy.deepcopy(model), ev_batch, bf16=False), ev_batch, window)
        rows.append({"round_to": str(used), "convs": conv_widths(model), "mmacs": macs / 1e6,
                     "train_img_s": alone, "train_mfu": alone * macs * 6 / peaks[TRAIN],
                     "recovery_img_s": with_t, "recovery_mfu": with_t * (macs * 6 + tmacs * 2) / peaks[TRAIN],
                     "infer_img_s": infer, "infer_mfu": infer * macs * 2 / peaks["fp32"]})
        print(table(rows[-1:], ROUNDING_COLUMNS), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=3.0, help="seconds per timing window (best of 3)")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, all cores, as trainer.num_threads=null does)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        global TRAIN  # decided again as a stage with trainer.num_threads decides it: probed at that count
        TRAIN = "bf16" if train_bf16() else "fp32"
    p = params()
    info = {"when": now(), "machine": machine()}
    print(describe(info["machine"]), flush=True)

    # bf16's peak only where the stages train in it: emulated bf16 takes minutes at these sizes
    peaks = {d: machine_peak(dtype) for d, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
             if d in (TRAIN, "fp32")}
    print("\nmatrix-multiply peak (best of 5; n x n times n x n as torch.matmul and as a 1x1 conv):")
    print(table([{"dtype": d, "op": op, **{f"n{n}": f / 1e9 for n, f in pk[key].items()},
                  "best": max(pk[key].values()) / 1e9}
                 for d, pk in peaks.items() for op, key in (("matmul", "per_size"), ("1x1 conv", "conv1x1_per_size"))],
                [("dtype", "dtype", "s"), ("op", "op", "s"), ("n1024", "n=1024 GFLOP/s", ",.0f"),
                 ("n2048", "n=2048", ",.0f"), ("n4096", "n=4096", ",.0f"), ("best", "best", ",.0f")]), flush=True)
    for d, pk in peaks.items():
        print(f"{d} peak used: {pk['flops'] / 1e9:,.0f} GFLOP/s (all {torch.get_num_threads()} threads at once: "
              f"{pk['all_threads'] / 1e9:,.0f}; one core x {torch.get_num_threads()}: "
              f"{pk['one_core_x_threads'] / 1e9:,.0f})")

    task, _ = load_target_task(args.artifacts)
    num_classes = len(task["classes"])
    models = stage_models(p, args.artifacts, num_classes)
    macs = {k: count_macs(copy.deepcopy(m)) for k, (m, _) in models.items()}
    print("\nmodels:")
    for k, (m, src) in models.items():
        print(f"  {k}: convs {conv_widths(m)}, {count_params(m) / 1e6:.2f} M params, {macs[k] / 1e6:.1f} M MACs; {src}")

    # training steps: (stage, model, batch, teacher forward too?)
    runs = [("pretrain", "teacher", p["pretrain"]["batch_size"], False),
            ("transfer", "teacher", p["transfer"]["batch_size"], False),
            ("distill (student only)", "student", p["distill"]["batch_size"], False),
            ("distill (+ teacher fwd)", "student", p["distill"]["batch_size"], True),
            ("prune recovery (pruned only)", "pruned", p["prune"]["batch_size"], False),
            # the stage as it runs: the recovery fine-tune distils from the teacher (DistillerModule)
            ("prune recovery (+ teacher fwd)", "pruned", p["prune"]["batch_size"], True)]
    rows = []
    peak = {d: pk["flops"] for d, pk in peaks.items()}
    for stage, name, batch, with_teacher in runs:
        model = copy.deepcopy(models[name][0])
        teacher = copy.deepcopy(models["teacher"][0]) if with_teacher else None
        rate, rates = best_rate(train_step_fn(model, batch, num_classes, teacher), batch, args.window)
        flop_per_img = macs[name] * 2 * 3 + (macs["teacher"] * 2 if with_teacher else 0)
        rows.append({"run": f"train: {stage}", "model": name, "batch": batch, "dtype": TRAIN, "img_s": rate,
                     "gflops": rate * flop_per_img / 1e9, "mfu": rate * flop_per_img / peak[TRAIN],
                     "windows": rates})
        print(table(rows[-1:], COLUMNS), flush=True)
    ev_batch = p["evaluate"]["throughput_batch"]
    for name in models:
        for bf16 in (True, False) if TRAIN == "bf16" else (False,):
            model = copy.deepcopy(models[name][0])
            rate, rates = best_rate(infer_fn(model, ev_batch, bf16), ev_batch, args.window)
            flop_per_img = macs[name] * 2
            rows.append({"run": "inference" + ("" if bf16 else " (as evaluate)"), "model": name, "batch": ev_batch,
                         "dtype": "bf16" if bf16 else "fp32", "img_s": rate, "gflops": rate * flop_per_img / 1e9,
                         "mfu": rate * flop_per_img / peak["bf16" if bf16 else "fp32"], "windows": rates})
            print(table(rows[-1:], COLUMNS), flush=True)

    print("\nmodel-FLOPs utilisation (MFU = achieved / measured peak of the same dtype):")
    print(table(rows, COLUMNS))

    print(f"\nthe student pruned at prune.ratio={p['prune']['ratio']} ({p['prune']['target']}) to any channel count vs "
          f"multiples of prune.round_to (training: {TRAIN}, batch {p['prune']['batch_size']}; inference: fp32 as "
          f"evaluate measures it, batch {ev_batch}):", flush=True)
    rounding = rounding_rows(p, models["student"][0], models["teacher"][0], num_classes, args.window,
                             peak)
    if len(rounding) == 2:
        a, b = rounding
        print(f"rounded / any count: training {b['train_img_s'] / a['train_img_s']:.2f}x, recovery step "
              f"{b['recovery_img_s'] / a['recovery_img_s']:.2f}x, inference {b['infer_img_s'] / a['infer_img_s']:.2f}x")

    teacher_step = train_step_fn(copy.deepcopy(models["teacher"][0]), p["transfer"]["batch_size"], num_classes)
    kinds = time_by_kind(teacher_step)
    print(f"\nwhere a teacher training step's time goes (torch.profiler, self CPU time, batch "
          f"{p['transfer']['batch_size']}):")
    print(table([{"kind": k, "share": v} for k, v in kinds.items()],
                [("kind", "op kind", "s"), ("share", "share", ".0%")]))
    student_kinds = time_by_kind(train_step_fn(copy.deepcopy(models["pruned"][0]), p["prune"]["batch_size"],
                                               num_classes))
    print(f"\nthe same for the pruned student (batch {p['prune']['batch_size']}):")
    print(table([{"kind": k, "share": v} for k, v in student_kinds.items()],
                [("kind", "op kind", "s"), ("share", "share", ".0%")]))

    convs = conv_layers(copy.deepcopy(models["teacher"][0]), p["transfer"]["batch_size"], args.window, peak[TRAIN])
    print(f"\neach convolution of the teacher alone ({TRAIN}, channels_last, batch {p['transfer']['batch_size']}; "
          f"MFU against the {TRAIN} peak):")
    print(table(convs, [("layer", "layer", "s"), ("shape", "conv", "s"), ("mmacs", "M MACs/img", ".1f"),
                        ("gflops", "fwd GFLOP/s", ",.0f"), ("mfu", "fwd MFU", ".0%"),
                        ("train_gflops", "fwd+bwd GFLOP/s", ",.0f"), ("train_mfu", "fwd+bwd MFU", ".0%"),
                        ("flop_per_byte", "fwd FLOP/byte", ".0f")]))

    info["machine_after"] = machine()
    print(f"\nafter: {describe(info['machine_after'])}")
    path = save("mfu" + (f"-threads{args.threads}" if args.threads else ""),
                {**info, "peak_flops": {k: v["flops"] for k, v in peaks.items()},
                 "peak_all_threads": {k: v["all_threads"] for k, v in peaks.items()},
                 "peak_one_core_x_threads": {k: v["one_core_x_threads"] for k, v in peaks.items()},
                 "peak_matmul_per_size": {k: v["per_size"] for k, v in peaks.items()},
                 "peak_conv1x1_per_size": {k: v["conv1x1_per_size"] for k, v in peaks.items()},
                 "models": {k: {"source": src, "macs": macs[k], "params": count_params(m), "convs": conv_widths(m)}
                            for k, (m, src) in models.items()},
                 "rows": rows, "pruned_rounding": rounding, "teacher_step_time_by_kind": kinds,
                 "pruned_step_time_by_kind": student_kinds,
                 "teacher_convs": convs})
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


ROUNDING_COLUMNS = [("round_to", "round_to", "s"), ("convs", "conv widths", "s"), ("mmacs", "M MACs", ".2f"),
                    ("train_img_s", "train img/s", ",.0f"), ("train_mfu", "train MFU", ".1%"),
                    ("recovery_img_s", "+ teacher fwd img/s", ",.0f"), ("recovery_mfu", "+ teacher MFU", ".1%"),
                    ("infer_img_s", "fp32 infer img/s", ",.0f"), ("infer_mfu", "fp32 infer MFU", ".1%")]

COLUMNS = [("run", "run", "s"), ("model", "model", "s"), ("batch", "batch", "d"), ("dtype", "dtype", "s"),
           ("img_s", "images/s", ",.0f"), ("gflops", "GFLOP/s", ",.1f"), ("mfu", "MFU", ".1%")]

if __name__ == "__main__":
    sys.exit(main_of(main))
