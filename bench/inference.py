"""fp32 CPU inference, three ways, in one run: the default NCHW layout (the baseline: how
`evaluate`, `predict` and the report ran models before), channels_last (how they run now,
transferkit/layout.py) and channels_last under torch.compile (inductor).

For the stage models (teacher, student, pruned student: from artifacts/ when present, as in
bench/mfu.py) and the other architectures of the zoo (conf/model/*.yaml):
- throughput at evaluate.batch_size (best of 3 windows);
- batch-1 latency, median of --calls calls, on all threads and on one;
- max |logit difference| and top-1 agreement of channels_last against the default layout on the
  same images (the prepared target test set when present), so the speed-up changes no result;
- torch.compile: seconds to compile (the first call) and how many images `evaluate` would have
  to score with one compiled model before the compile pays for itself (it scores 10,000 per
  model: 5,000 test images, with mirror test-time augmentation).

    uv run python bench/inference.py [--window 2] [--calls 200] [--no-compile]

Prints a table and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, describe, finish, fresh_inductor_cache, load_target_task, machine, main_of, now, params, table  # noqa: E402
from mfu import best_rate, stage_models  # noqa: E402

from transferkit.models import model_from_config  # noqa: E402

NHWC = torch.channels_last


@torch.inference_mode()
def latency_ms(model, calls: int, nhwc: bool) -> float:
    x = torch.rand(1, 3, 32, 32)
    x = x.contiguous(memory_format=NHWC) if nhwc else x
    for _ in range(10):
        model(x)
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        model(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def measure(model: torch.nn.Module, images: torch.Tensor, batch: int, window: float, calls: int,
            compile_too: bool) -> dict:
    """Layout changes happen outside inference_mode, as transferkit/layout.py does them."""
    model = model.eval()
    x, xl = torch.rand(batch, 3, 32, 32), torch.rand(batch, 3, 32, 32).contiguous(memory_format=NHWC)
    batches = range(0, len(images), batch)
    row = {}
    with torch.inference_mode():
        ref = torch.cat([model(images[i:i + batch]) for i in batches])
        row["default_img_s"], _ = best_rate(lambda: model(x), batch, window)
    row["default_ms"] = latency_ms(model, calls, nhwc=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    row["default_ms_1t"] = latency_ms(model, calls, nhwc=False)
    torch.set_num_threads(threads)

    model.to(memory_format=NHWC)
    with torch.inference_mode():
        out = torch.cat([model(images[i:i + batch].contiguous(memory_format=NHWC)) for i in batches])
        row["nhwc_img_s"], _ = best_rate(lambda: model(xl), batch, window)
    row["max_abs_diff"] = float((out - ref).abs().max())
    row["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).float().mean())
    row["nhwc_ms"] = latency_ms(model, calls, nhwc=True)
    torch.set_num_threads(1)
    row["nhwc_ms_1t"] = latency_ms(model, calls, nhwc=True)
    torch.set_num_threads(threads)
    row["speedup"] = row["nhwc_img_s"] / row["default_img_s"]
    row["latency_speedup"] = row["default_ms"] / row["nhwc_ms"]

    if compile_too:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        with torch.inference_mode():
            t = time.perf_counter()
            compiled(xl)
            row["compile_s"] = time.perf_counter() - t
            row["compiled_img_s"], _ = best_rate(lambda: compiled(xl), batch, window)
        saved_per_image = 1 / row["nhwc_img_s"] - 1 / row["compiled_img_s"]
        row["break_even_images"] = row["compile_s"] / saved_per_image if saved_per_image > 0 else None
    return row


COLUMNS = [("model", "model", "s"), ("batch", "batch", "d"),
           ("default_img_s", "NCHW img/s", ",.0f"), ("nhwc_img_s", "channels_last img/s", ",.0f"),
           ("speedup", "speed-up", ".2f"),
           ("default_ms", "NCHW b=1 ms", ".2f"), ("nhwc_ms", "channels_last b=1 ms", ".2f"),
           ("default_ms_1t", "NCHW b=1 ms, 1 thread", ".2f"), ("nhwc_ms_1t", "channels_last b=1 ms, 1 thread", ".2f"),
           ("max_abs_diff", "max abs logit diff", ".1e"), ("top1_agreement", "top-1 agreement", ".4f")]
COMPILE_COLUMNS = [("model", "model", "s"), ("nhwc_img_s", "channels_last img/s", ",.0f"),
                   ("compiled_img_s", "+ torch.compile img/s", ",.0f"), ("compile_s", "compile s", ".1f"),
                   ("break_even_images", "images to break even (blank: never)", ",.0f")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=2.0, help="seconds per throughput window (best of 3)")
    ap.add_argument("--calls", type=int, default=200, help="batch-1 calls per latency (median)")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = ap.parse_args(argv)
    fresh_inductor_cache()
    p = params()
    batch = p["evaluate"]["batch_size"]
    info = {"when": now(), "machine": machine(), "batch": batch}
    print(describe(info["machine"]), flush=True)

    task, source = load_target_task(args.artifacts)
    # .contiguous(): the reference arm must be NCHW; image-folder tasks are stored NHWC, and an
    # NHWC input would put the "default" arm in channels_last too
    images = ((task["test_x"] if "test_x" in task else task["train_x"])[:2000].float() / 255).contiguous()
    n_classes = len(task["classes"])
    models = {k: m for k, (m, _) in stage_models(p, args.artifacts, n_classes).items()}
    for f in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        # fastnet and its presets (which inherit its name through defaults) are the stage models above
        if cfg.get("name", "fastnet") != "fastnet":
            torch.manual_seed(0)
            models[f.stem] = model_from_config(cfg, n_classes)
    print(f"images for the logit check: {len(images)} from {source}\n", flush=True)

    rows = []
    for name, model in models.items():
        row = {"model": name, "batch": batch, **measure(copy.deepcopy(model), images, batch, args.window,
                                                          args.calls, not args.no_compile)}
        rows.append(row)
        print(table([row], COLUMNS), flush=True)
    print(f"\nfp32 inference, default layout (NCHW) vs channels_last, batch {batch} and batch 1:")
    print(table(rows, COLUMNS))
    if not args.no_compile:
        print("\nchannels_last vs channels_last + torch.compile (inductor), fp32, batch "
              f"{batch}; break-even: images scored before the compile time is paid back (none: never)")
        print(table(rows, COMPILE_COLUMNS))
    finish("inference", info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_of(main))
