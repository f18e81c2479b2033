"""INT8 formats and settings against the fp32 ONNX model they come from, side by side in one run:
the deployable model (export's fp32 ONNX file) quantized as the quantize stage does in ONNX
Runtime's QOperator format (QLinearConv and friends: the default) and in its QDQ format
(Quantize/DequantizeLinear pairs around float operators, which the runtime fuses), per-channel
or not, with 7-bit weights (quantize.reduce_range, the default) or 8-bit ones (accurate only on
CPUs with VNNI: deploy/quantize.py), with minmax calibration (the default) and the other
quantize.method values. For each: top-1 on the target test set (no TTA), agreement with fp32,
file size, batch-1 latency (median) and throughput at batch 256 (best round) on 2 threads and on
1, the models taking turns.

    uv run python bench/int8.py --artifacts DIR [--repeats 300] [--throughput-repeats 10] [--profile]

--profile adds where the time goes at batch 256: ONNX Runtime's profiler, share of kernel time
by operator and milliseconds by node, for fp32 and the default INT8 model. Two more variants keep
the first convolution (fastnet's 3-channel stem) in float, or export the pruned student without
padding its input to 4 channels (deploy/fold.py: pad_input_channels), in fp32 and INT8.

DIR holds a finished pipeline's `prepare`, `prune` and `export` (e.g. artifacts/). Prints the CPU, whether
it has AVX-512 VNNI (the int8 dot-product instructions ONNX Runtime's kernels use), and its
measured matmul peaks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, describe, finish, machine, main_of, now, table  # noqa: E402

from transferkit.config.compose import load_params  # noqa: E402
from transferkit.deploy.export import add_onnx_metadata, export_onnx  # noqa: E402
from transferkit.deploy.fold import fold_batchnorm, fold_input_scaling  # noqa: E402
from transferkit.deploy.quantize import METHODS, calibration_images, quantize  # noqa: E402
from transferkit.evaluation.speed import cpu_latency_ms, onnx_throughput  # noqa: E402
from transferkit.evaluation.metrics import predict_onnx  # noqa: E402
from transferkit.models import load_checkpoint  # noqa: E402
from transferkit.stages.common import load_task  # noqa: E402
from transferkit.training.precision import cpuinfo  # noqa: E402

VARIANTS = {"int8 qoperator, per-channel, 7-bit weights (default)": {"fmt": "qoperator", "per_channel": True,
                                                                    "reduce_range": True},
            "int8 qoperator, per-channel, 8-bit weights": {"fmt": "qoperator", "per_channel": True,
                                                           "reduce_range": False},
            "int8 qdq, per-channel, 7-bit weights": {"fmt": "qdq", "per_channel": True, "reduce_range": True},
            "int8 qoperator, per-tensor, 7-bit weights": {"fmt": "qoperator", "per_channel": False,
                                                          "reduce_range": True},
            **{f"int8 qoperator, per-channel, 7-bit weights, {method} calibration":
               {"fmt": "qoperator", "per_channel": True, "reduce_range": True, "method": method}
               for method in METHODS if method != "minmax"}}


def on_threads(threads: int, measure, *args):
    """`measure(*args)` with ONNX Runtime (and torch) on `threads` threads, as evaluate sets them."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure(*args)
    finally:
        torch.set_num_threads(before)


def op_shares(path: Path, threads: int, runs: int = 20) -> dict:
    """Share of kernel time by operator type at batch 256 (ONNX Runtime's profiler), ms per run,
    and ms per run of each node (the runtime's own node names: its layout passes rename them)."""
    import collections
    import json
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, threads
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "transferkit_int8_profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: torch.rand(256, 3, 32, 32).numpy()}
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    spent, nodes = collections.Counter(), collections.Counter()
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
            nodes[f"{event['args']['op_name']} {event['name'].removesuffix('_kernel_time')}"] += event["dur"]
    os.remove(trace)
    total = sum(spent.values())
    return {"ms_per_run": total / runs / 1000, **{op: round(100 * us / total, 1) for op, us in spent.most_common()},
            "nodes_ms": {node: round(us / runs / 1000, 3) for node, us in nodes.most_common()}}


def first_conv_node(path: Path) -> str:
    import onnx

    return next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")


def export_unpadded(artifacts: Path, path: Path) -> Path:
    """The pruned student as export writes it, but for the input padding: 3 input channels."""
    model, _ = load_checkpoint(artifacts / "prune" / "model.pt", "prune", what="the pruned student")
    export_onnx(fold_input_scaling(fold_batchnorm(model)), path, int(model.input_size), "auto", None,
                log=lambda *_: None)
    add_onnx_metadata(path, {})  # as export cleans its file (a file size to compare)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--throughput-repeats", type=int, default=10, help="rounds at batch 256, the models taking turns")
    ap.add_argument("--profile", action="store_true", help="where the time goes at batch 256, by operator")
    args = ap.parse_args(argv)
    task = load_task(args.artifacts / "prepare", "target")  # the inputs first, before the seconds of the peaks
    info = {"when": now(), "machine": machine(), "vnni": "avx512_vnni" in cpuinfo("flags").split()}
    print(f"{describe(info['machine'])}; AVX-512 VNNI: {'yes' if info['vnni'] else 'no'}", flush=True)
    # the settings the quantize stage of DIR ran with, not this checkout's (which may differ)
    ran_with = args.artifacts / "quantize" / "params.yaml"
    q = OmegaConf.to_container(load_params(ran_with if ran_with.is_file() else ROOT / "params.yaml").quantize)
    calibration = calibration_images(task, q["calibration_images"])
    fp32 = args.artifacts / "export" / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        unpadded = export_unpadded(args.artifacts, Path(tmp) / "unpadded.onnx")
        files = {"fp32": fp32, "fp32, 3 input channels": unpadded}
        variants = {**VARIANTS, "int8 qoperator, per-channel, first conv in float":
                    {"fmt": "qoperator", "per_channel": True, "reduce_range": True,
                     "keep_float": [first_conv_node(fp32)]},
                    "int8 qoperator, per-channel, 3 input channels": {"fmt": "qoperator", "per_channel": True,
                                                                      "reduce_range": True}}
        for name, v in variants.items():
            files[name] = Path(tmp) / f"{len(files)}.onnx"
            quantize(unpadded if "3 input" in name else fp32, files[name], calibration,
                     **{"method": q["method"], "keep_float": q["keep_float"], **v})
        y = task["test_y"].numpy()
        logits = {name: predict_onnx(path, task["test_x"], 500).numpy() for name, path in files.items()}
        two, one = (on_threads(n, lambda: cpu_latency_ms({}, args.repeats, onnx_files=files)) for n in (2, 1))
        img_s2, img_s1 = (on_threads(n, onnx_throughput, files, 256, args.throughput_repeats) for n in (2, 1))
        rows = [{"model": name, "top1": 100 * float((logits[name].argmax(1) == y).mean()),
                 "agree": 100 * float((logits[name].argmax(1) == logits["fp32"].argmax(1)).mean()),
                 "kb": path.stat().st_size / 1024, "size_x": fp32.stat().st_size / path.stat().st_size,
                 "ms2": two[name], "ms1": one[name], "img_s": img_s2[name], "img_s1": img_s1[name]}
                for name, path in files.items()]
        if args.profile:
            default = next(iter(VARIANTS))
            info["profile"] = {name: op_shares(files[name], torch.get_num_threads()) for name in ("fp32", default)}
    base = rows[0]
    for r in rows:
        r["speed_x"], r["latency_x"] = r["img_s"] / base["img_s"], r["ms2"] / base["ms2"]
        r["speed1_x"] = r["img_s1"] / base["img_s1"]
    print(table(rows, [("model", "model", "s"), ("top1", "top-1 %", ".2f"), ("agree", "agrees with fp32 %", ".2f"),
                       ("kb", "file KiB", ".0f"), ("size_x", "smaller (x)", ".2f"),
                       ("ms2", "batch 1, 2 threads ms", ".3f"),
                       ("ms1", "batch 1, 1 thread ms", ".3f"), ("latency_x", "latency vs fp32", ".2f"),
                       ("img_s", "img/s, batch 256, 2 threads", ",.0f"), ("speed_x", "vs fp32", ".2f"),
                       ("img_s1", "img/s, batch 256, 1 thread", ",.0f"), ("speed1_x", "vs fp32", ".2f")]))
    for name, shares in info.get("profile", {}).items():
        print(f"{name}, batch 256: {shares['ms_per_run']:.1f} ms of kernels per run; share by operator: "
              + ", ".join(f"{op} {share}%" for op, share in shares.items() if op not in ("ms_per_run", "nodes_ms")))
        print("  ms per run by node: " + ", ".join(f"{node} {ms}" for node, ms in shares["nodes_ms"].items()))
    finish("int8", info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main_of(main))
