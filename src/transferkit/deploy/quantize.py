"""INT8 post-training static quantization of an exported ONNX model, with ONNX Runtime's own
tools (onnxruntime.quantization): per-channel int8 weights, uint8 activations whose ranges are
calibrated on training images, in a format ONNX Runtime's CPU kernels execute natively. The
result is judged against the fp32 model on the val images before it is kept (decision_split) and
scored against it on the test set.

reduce_range keeps the weights to 7 bits ([-64, 64]): x86 CPUs without VNNI (AVX2, AVX-512
before VNNI) multiply uint8 by int8 and add each pair of products in 16 bits, which full-range
weights overflow, so a full-range file is accurate only on CPUs with VNNI."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from transferkit.data.tasks import train_sample
from transferkit.deploy.runtime import META_KEY
from transferkit.errors import TransferkitError
from transferkit.evaluation.metrics import predict_onnx
from transferkit.io import disk_full

METHODS = ("minmax", "entropy", "percentile")
# Calibrator settings by method. quantize_static builds the entropy calibrator with 128 histogram bins,
# as many as the KL search's quantized bins, so its only candidate is the full range (minmax's); 2048
# bins give the search TensorRT's and PyTorch's histogram resolution.
CALIBRATOR_OPTIONS = {"minmax": {}, "entropy": {"num_bins": 2048}, "percentile": {}}
FORMATS = ("qoperator", "qdq")
# ops whose INT8 output keeps their input's scale and zero point, and that commute with a clamp
SAME_GRID = ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def calibration_images(task: dict, n: int) -> np.ndarray:
    """`n` training images spread evenly over the (class-sorted) train split, as the model takes them."""
    count = len(task["train_y"])
    if not 1 <= n <= count:
        raise TransferkitError(f"quantize.calibration_images={n} is invalid: the target task has {count} training "
                               f"images to calibrate on. Fix: set it in 1..{count}.")
    return (train_sample(task, n)[0].float() / 255).contiguous().numpy()


def float_nodes(model_path: Path, keep_float, shown: Path | None = None) -> list[str]:
    """The names of the nodes that stay in float: each entry of `keep_float` is a node name or an op type.
    `shown`: the file an error names, when `model_path` is a temporary copy of it."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    known = {n.name for n in nodes} | {n.op_type for n in nodes}
    unknown = [k for k in keep_float if k not in known]
    if unknown:  # the classifier: the last Gemm, or MatMul where the legacy exporter wrote a Linear without bias
        head = next((f" ({n.op_type} keeps the classifier in float)" for n in reversed(nodes)
                     if n.op_type in ("Gemm", "MatMul")), "")
        raise TransferkitError(f"quantize.keep_float={list(keep_float)}: {unknown} is neither a node name nor an op "
                               f"type of {shown or model_path} (nodes: {[n.name for n in nodes]}). Fix: use names or "
                               f"op types from that list{head}.")
    return [n.name for n in nodes if n.name in keep_float or n.op_type in keep_float]


def quantized_ops(path: Path) -> list[str]:
    """The op types of `path`'s graph that only a quantized model holds (none in an fp32 export); an unreadable
    file has none here: quantize_static says what is wrong with it."""
    import onnx

    try:
        nodes = onnx.load(str(path)).graph.node
    except Exception:  # noqa: BLE001 - onnx raises several types for a damaged file
        return []
    return sorted({n.op_type for n in nodes if n.op_type.startswith(("QLinear", "QGemm")) or n.op_type in
                   ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger")})


def quantize(fp32: Path, out: Path, calibration: np.ndarray, *, method: str, fmt: str, per_channel: bool,
             reduce_range: bool, keep_float=(), trained_ranges=()) -> float:
    """Write the INT8 model to `out`; returns the seconds it took. `trained_ranges`: the (low, high) bounds of the
    Clips whose outputs keep that range instead of a calibrated one (qat.TrainedRange's)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          create_calibrator, quant_pre_process, quantize_static)
    from onnxruntime.quantization.calibrate import save_tensors_data

    if method not in METHODS or fmt not in FORMATS:
        raise TransferkitError(f"quantize.method={method!r} / quantize.format={fmt!r}: use a method of {list(METHODS)} "
                               f"and a format of {list(FORMATS)}. Fix: set them in conf/ or as overrides.")

    # batches of one size: the histogram calibrators (entropy, percentile) stack all batches' activations as one array
    size = next(d for d in range(min(64, len(calibration)), 0, -1) if len(calibration) % d == 0)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter({"images": calibration[i:i + size]} for i in range(0, len(calibration), size))

        def get_next(self):
            return next(self.batches, None)

    if done := quantized_ops(fp32):  # ONNX Runtime would warn, dump its graph and quantize its float parts anyway
        raise TransferkitError(f"{fp32} is quantized already (it holds {', '.join(done)} nodes), and quantize takes "
                               f"an fp32 export. Fix: give export's model.onnx (`dvc repro export`; for a folder given "
                               f"as --in export=, `transferkit export MODEL.pt --out DIR`).")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference and graph clean-up first, as ONNX Runtime recommends
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            excluded = float_nodes(prepared, keep_float, shown=fp32)
            calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                "percentile": CalibrationMethod.Percentile}[method]
            # the ranges are computed here and handed over as quantize_static's cache: it takes no calibrator settings
            calibrator = create_calibrator(prepared, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=calibrate_method, extra_options=CALIBRATOR_OPTIONS[method])
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
                calibrator.collect_data(Batches())
                ranges = calibrator.compute_data()
            keep_trained_ranges(ranges, prepared, trained_ranges)
            save_tensors_data(ranges, Path(tmp) / "ranges.json")
            quantize_static(str(prepared), str(out), None, per_channel=per_channel, reduce_range=reduce_range,
                            nodes_to_exclude=excluded,
                            quant_format={"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}[fmt],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate_method, calibration_cache_path=str(Path(tmp) / "ranges.json"))
        except TransferkitError:
            raise
        except Exception as e:  # onnx/onnxruntime raise many types for models they cannot handle
            if disk_full(e):  # the storage, not the model: the stage's disk-full error names the fix
                raise
            raise TransferkitError(f"ONNX Runtime cannot quantize {fp32} ({type(e).__name__}: {str(e)[:300]}). Fix: "
                                   f"export the model again (`dvc repro export`; for a folder given as --in export=, "
                                   f"`transferkit export MODEL.pt --out DIR`), or try quantize.format=qdq.") from e
    copy_metadata(fp32, out)
    return time.perf_counter() - start


def keep_trained_ranges(ranges, model_path: Path, trained) -> None:
    """Each Clip of `model_path` bounded by a pair of `trained` gives its output that range: quantization-aware
    fine-tuning trained the next layer's weights on inputs quantized over it, and the few images calibration sees
    reach only part of it, so a calibrated range would round them on another grid. The range also goes up through
    the ops before the Clip that INT8 runs on their input's grid (MaxPool, Reshape...): a clamp commutes with them,
    and ONNX Runtime quantizes their output with their input's range."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.calibrate import TensorData

    if not trained:  # post-training quantization: nothing to read the graph for
        return
    wanted = {(np.float32(low), np.float32(high)) for low, high in trained}
    graph = onnx.load(str(model_path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                  if n.op_type == "Constant" and n.attribute[0].name == "value"}
    producer = {out: n for n in graph.node for out in n.output}
    readers = collections.Counter(i for n in graph.node for i in n.input)
    for node in (n for n in graph.node if n.op_type == "Clip"):
        bounds = tuple(np.float32(constants[b]) for b in node.input[1:3] if b in constants)
        if bounds not in wanted or node.output[0] not in ranges:
            continue
        tensor, kept = node.output[0], TensorData(lowest=bounds[0], highest=bounds[1])
        ranges[tensor] = kept
        # up to the Clip's input, then on through each op before it that keeps its input's grid
        while (tensor := producer[tensor].input[0]) in ranges and readers[tensor] == 1:
            ranges[tensor] = kept
            if tensor not in producer or producer[tensor].op_type not in SAME_GRID:
                break


def copy_metadata(src: Path, dest: Path) -> None:
    """The class names travel with the file, as in the fp32 model."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    model = onnx.load(str(dest))
    if META_KEY in meta:
        onnx.helper.set_model_props(model, {META_KEY: meta[META_KEY]})
    onnx.save(model, str(dest))


def check(fp32: Path, int8: Path, task: dict, threads: int, split: str = "test") -> dict:
    """Top-1 of both models, how often they agree and their largest logit difference, on a split."""
    a, b = (predict_onnx(p, task[f"{split}_x"], 500, threads=threads).numpy() for p in (fp32, int8))
    y = task[f"{split}_y"].numpy()
    return {"fp32_top1": float((a.argmax(1) == y).mean()), "int8_top1": float((b.argmax(1) == y).mean()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(a - b).max()), f"n_{split}": int(len(y))}


def sizes(fp32: Path, int8: Path) -> dict:
    """Both files' bytes and how many times smaller the INT8 one is."""
    size = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    return {"bytes": size, "size_ratio": size["fp32"] / size["int8"]}


def loss_of(result: dict) -> float:
    """Top-1 points (as a fraction) the INT8 model loses against fp32."""
    return result["fp32_top1"] - result["int8_top1"]


def decision_split(task: dict) -> str:
    """Where the INT8 model's loss is judged, to choose fine-tuning or refuse: held-out val images,
    or the training images where the task keeps none; never the test images it is scored on."""
    return "val" if len(task["val_y"]) else "train"


def refuse(result: dict, max_drop: float, qat_epochs: int, reduce_range: bool = True,
           split: str = "val") -> TransferkitError:
    how = (f"after {qat_epochs} epoch{'s' * (qat_epochs != 1)} of quantization-aware fine-tuning" if qat_epochs
           else "after post-training quantization")
    fix = ("more quantize.qat_epochs, more calibration images (quantize.calibration_images) or another "
           "quantize.method" if qat_epochs else "set quantize.qat_epochs (e.g. 5) to fine-tune the model for INT8, "
           "or calibrate on more images (quantize.calibration_images) or with another quantize.method")
    if not reduce_range:  # 8-bit weights overflow the u8 x s8 multiply of x86 CPUs without VNNI
        fix += ", or quantize.reduce_range=true (7-bit weights)"
    return TransferkitError(f"the INT8 model loses {100 * loss_of(result):.2f} points of top-1 against fp32 on the "
                            f"{split} images ({100 * result['int8_top1']:.2f}% vs {100 * result['fp32_top1']:.2f}%) "
                            f"{how}, more "
                            f"than quantize.max_drop={max_drop}. Fix: {fix}.")


def describe(result: dict) -> str:
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
