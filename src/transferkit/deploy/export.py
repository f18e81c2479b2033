"""transferkit export: a trained model -> ONNX + TorchScript, each checked against PyTorch.

    transferkit export MODEL.pt [--out DIR] [--test-set artifacts/prepare/target.pt]

Loads any checkpoint a stage wrote (pruned models are rebuilt from their recorded layer shapes), exports ONNX (dynamic
batch axis, torch.export-based exporter by default) and TorchScript (traced), runs both and the PyTorch model in fp32
on the test set images (uint8 / 255, as `evaluate` feeds them), and reports for each the largest absolute logit
difference from PyTorch and the top-1 agreement, then the batch-1 CPU latency of the three (median of --repeats calls,
taking turns). Writes DIR/model.onnx, DIR/model.torchscript.pt and DIR/export.json (these numbers, the class names),
each renamed into place after the checks pass (a failed export leaves the last one)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from transferkit.data.tasks import task_fault
from transferkit.deploy.fold import deployable
from transferkit.deploy.runtime import (EXPORT_JSON, META_KEY, ONNX_FILE, TORCHSCRIPT_FILE, Classifier,
                                        load_pipeline_checkpoint)
from transferkit.deploy.sessions import ort_session
from transferkit.errors import TransferkitError, one_line_errors
from transferkit.evaluation.formats import busy_note
from transferkit.evaluation.speed import latency_ms, other_work
from transferkit.io import atomic_path, load_torch, quiet_output
from transferkit.layout import channels_last, to_nhwc
from transferkit.tracked import check_untracked

DEFAULT_TEST_SET = Path("artifacts/prepare/target.pt")
RANDOM_IMAGES = 256  # checked on these (seeded) when no test set fits the model
TEST_SET = "pass the target.pt that the prepare stage wrote (artifacts/prepare/target.pt)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = one_line_errors(argparse.ArgumentParser(prog="transferkit export", description=__doc__.split("\n\n")[0],
                                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("model", type=Path, help="a model.pt written by any stage (artifacts/<stage>/model.pt)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: outputs/export/FOLDER for FOLDER/model.pt, FOLDER-NAME for NAME.pt)")
    p.add_argument("--test-set", type=Path, default=None,
                   help=f"prepared task (prepare's target.pt) whose test images the exports are checked on "
                        f"(default: {DEFAULT_TEST_SET} if it exists and has the model's classes, "
                        f"else {RANDOM_IMAGES} random images)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed logit difference from PyTorch, plus 1e-6 of the logit (default 1e-4)")
    p.add_argument("--repeats", type=int, default=300, help="latency: batch-1 calls per runtime (default 300)")
    p.add_argument("--batch-size", type=int, default=500, help="batch size of the checks (default 500)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every runtime in the checks and the latency (default: torch's, "
                        f"{torch.get_num_threads()} here)")
    p.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                   help="ONNX exporter: torch.export-based (dynamo), the TorchScript-based one (legacy), or auto "
                        "(default): dynamo, and legacy where dynamo fails")
    opsets = range(torch.onnx._constants.ONNX_MIN_OPSET, torch.onnx._constants.ONNX_MAX_OPSET + 1)  # torch's
    p.add_argument("--opset", type=int, choices=opsets, default=None, metavar="N",
                   help=f"ONNX opset, {opsets[0]} to {opsets[-1]} (default: the exporter's)")
    args = p.parse_args(argv)
    if not 0 < args.tolerance < float("inf"):  # nan and inf too: nothing would differ from PyTorch by more
        p.error("--tolerance must be a number > 0")
    if args.repeats < 1 or args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        p.error("--repeats, --batch-size and --threads must be >= 1")
    return args


# --------------------------------------------------------------------------- images to check on
def check_images(test_set: Path | None, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """uint8 [N, 3, S, S] images (+ labels when from a test set) and a description."""
    explicit = test_set is not None
    path = test_set if explicit else DEFAULT_TEST_SET
    if explicit and not path.is_file():
        raise TransferkitError(f"--test-set {path} {'is a folder' if path.is_dir() else 'not found'}. Fix: {TEST_SET}.")
    if path.exists() or explicit:
        task = load_torch(path, "prepared task", "prepare", TEST_SET if explicit else None)  # or: unreadable
        if fault := task_fault(task, splits=("test",)) or (not len(task["test_x"]) and "its test split holds no "
                                                             "images, which the exported files are checked on"):
            raise TransferkitError(f"{'--test-set ' * explicit}{path} is not a prepared task: {fault}. "
                                   f"Fix: {TEST_SET}.")
        if list(task["classes"]) == classes and tuple(task["test_x"].shape[1:]) == (3, size, size):
            return task["test_x"], task["test_y"], f"test set of {path} ({len(task['test_x'])} images)"
        if explicit:
            raise TransferkitError(
                f"{path} holds classes {list(task['classes'])} at {tuple(task['test_x'].shape[2:])} px, but the "
                f"model predicts {classes} at {size}x{size}. Fix: pass the target.pt of the task this model "
                f"was trained on, or leave --test-set out to check on random images.")
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (RANDOM_IMAGES, 3, size, size), dtype=torch.uint8, generator=g), None,
            f"{RANDOM_IMAGES} random images ({f'{path} holds other classes' if path.exists() else f'no {path} here'})")


# --------------------------------------------------------------------------- exporters
def _export_dynamo(model: torch.nn.Module, path: Path, example: tuple, opset: int | None) -> None:
    program = torch.onnx.export(model, example, dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                external_data=False, verbose=False)
    program.save(str(path), external_data=False)


def _export_legacy(model: torch.nn.Module, path: Path, example: tuple, opset: int | None) -> None:
    torch.onnx.export(model, example, str(path), dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset or 17)


EXPORTERS = {"dynamo": _export_dynamo, "legacy": _export_legacy}


def export_onnx(model: torch.nn.Module, path: Path, size: int, exporter: str, opset: int | None, log=print) -> dict:
    """Export with `exporter`; 'auto' tries the torch.export-based exporter and falls back to the TorchScript-based
    one, which some torch versions need. Returns which one produced the file (and why the first failed)."""
    example, tried = (torch.rand(2, 3, size, size),), {}
    for name in (("dynamo", "legacy") if exporter == "auto" else (exporter,)):
        try:
            with warnings.catch_warnings(), quiet_output():  # the failure's own words go into `tried`
                warnings.simplefilter("ignore")
                EXPORTERS[name](model, path, example, opset)
            if (got := _drop_stack_traces(path)) != (opset or got):  # dynamo keeps its own where it cannot convert
                raise ValueError(f"it wrote opset {got}, not the {opset} asked for")
            return {"used": name, **({"failed": tried} if tried else {})}
        except Exception as e:  # exporter failures come in many types
            tried[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if exporter == "auto" and name == "dynamo":
                log(f"transferkit export: the dynamo ONNX exporter failed ({tried[name][:200]}); "
                    f"falling back to the TorchScript-based exporter")
    fix = ["leave --opset out"] * bool(opset) + ["try --exporter auto"] * (exporter != "auto")
    failed = "; ".join(f"{k}: {v.rstrip('.')}" for k, v in tried.items())  # the exporters' own end in a period
    raise TransferkitError(f"ONNX export failed: {failed}. Fix: {', or '.join(fix) or 'report the architecture'}.")


def _drop_stack_traces(path: Path) -> int:
    """The dynamo exporter annotates the graph with its Python stack traces, which hold this
    machine's file paths: they go, so no exported file's bytes depend on where the project lives. Checks
    the graph (an op newer than the opset asked for fails here, which `auto` falls back from); returns its opset."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    for item in (g, *g.node, *g.value_info, *g.input, *g.output, *g.initializer):
        if hasattr(item, "metadata_props"):
            del item.metadata_props[:]
    onnx.save(model, str(path))
    onnx.checker.check_model(model)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def add_onnx_metadata(path: Path, meta: dict) -> int:
    """Embed class names (so the ONNX file alone is enough); returns its opset."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    onnx.save(model, str(path))
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_torchscript(model: torch.nn.Module, path: Path, size: int, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream, still the TorchScript format
        traced = torch.jit.trace(model, torch.rand(2, 3, size, size), check_trace=False)
        saved = io.BytesIO()  # saved to a path, the archive's folder would be named after it (a temporary name)
        torch.jit.save(traced, saved, _extra_files={META_KEY: json.dumps(meta)})
    # the debug records map the code to the source files it was traced from, by their absolute paths
    # (this machine's folders), and the serialization id hashes them; loading needs neither
    with zipfile.ZipFile(saved) as archive, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in archive.infolist():
            if not info.filename.endswith((".debug_pkl", "/.data/serialization_id")):
                out.writestr(info, archive.read(info))


# --------------------------------------------------------------------------- checks and latency
def logits_of(run, images: torch.Tensor, batch_size: int) -> np.ndarray:
    out = [run(images[i:i + batch_size].float().div(255).numpy()) for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def compare(ref: np.ndarray, other: np.ndarray, labels: torch.Tensor | None, tolerance: float) -> dict:
    # within: each logit within `tolerance` plus fp32's rounding, which grows with it (1e-4 on a logit of 670)
    res = {"max_abs_diff": float(np.abs(ref - other).max()),
           "within": bool(np.all(np.abs(ref - other) <= tolerance + 1e-6 * np.abs(ref))),
           "top1_agreement": float((ref.argmax(1) == other.argmax(1)).mean())}
    if labels is not None:
        res["top1"] = float((other.argmax(1) == labels.numpy()).mean())
    return res


def export(model_path: Path, out: Path, test_set: Path | None = None, *, tolerance: float = 1e-4,
           repeats: int = 300, batch_size: int = 500, exporter: str = "auto", opset: int | None = None,
           threads: int | None = None, log=print) -> dict:
    model, ckpt = load_pipeline_checkpoint(model_path)
    classes, size = list(ckpt["classes"]), int(model.input_size)
    images, labels, checked_on = check_images(test_set, classes, size)
    meta = {"classes": classes, "input_size": size, "arch": ckpt["arch"],
            "input": f"float32 [N, 3, {size}, {size}] RGB in [0, 1] (uint8 / 255); normalisation is inside the model",
            "output": "logits [N, classes]"}
    previous_threads, threads = torch.get_num_threads(), threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _export(model, ckpt, model_path, out, images, labels, checked_on, meta, threads,
                         tolerance, repeats, batch_size, exporter, opset)
    finally:
        torch.set_num_threads(previous_threads)
    log(summary(result, out))
    return result


def _export(model, ckpt, model_path, out, images, labels, checked_on, meta, threads, tolerance, repeats,
            batch_size, exporter, opset) -> dict:
    classes, size = meta["classes"], meta["input_size"]
    for stale in (f for name in (EXPORT_JSON, ONNX_FILE, TORCHSCRIPT_FILE) for f in out.glob(f".{name}.*.tmp")):
        stale.unlink(missing_ok=True)  # a killed export's temporaries: DVC would track them as outputs
    with (atomic_path(out / EXPORT_JSON) as record, atomic_path(out / ONNX_FILE) as onnx_tmp,
          atomic_path(out / TORCHSCRIPT_FILE) as ts_tmp):  # all written inside; the record renamed last
        t = time.perf_counter()
        deployed = deployable(model)  # checked below against the model as trained
        used = export_onnx(deployed, onnx_tmp, size, exporter, opset)
        used_opset = add_onnx_metadata(onnx_tmp, meta)
        export_torchscript(deployed, ts_tmp, size, meta)
        export_s = time.perf_counter() - t

        def eager(x):  # as `transferkit predict` runs a model.pt: channels_last (transferkit/layout.py)
            with torch.inference_mode():
                return model(to_nhwc(torch.from_numpy(x))).numpy()

        session, ts = ort_session(onnx_tmp, threads), Classifier(ts_tmp, threads, trust_code=True)  # written just now
        onnx_run = lambda x, s=session, name=session.get_inputs()[0].name: s.run(None, {name: x})[0]  # noqa: E731
        with channels_last(model), other_work(load := {}):  # load: other processes' share of the CPU meanwhile
            ref = logits_of(eager, images, batch_size)
            checks = {"onnx": compare(ref, logits_of(onnx_run, images, batch_size), labels, tolerance),
                      "torchscript": compare(ref, logits_of(ts, images, batch_size), labels, tolerance)}
            failed = {k: v["max_abs_diff"] for k, v in checks.items() if not v["within"]}
            if failed:
                raise TransferkitError(
                    f"exported model differs from PyTorch on {checked_on}: max abs logit difference "
                    f"{', '.join(f'{k} {v:.3g}' for k, v in failed.items())} > {tolerance:g} + 1e-6 x |logit|; "
                    f"nothing written. Fix: try --exporter {'dynamo' if used['used'] == 'legacy' else 'legacy'}, "
                    f"a larger --tolerance if that difference is acceptable, or report the architecture.")
            x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
            latency = latency_ms({name: (lambda run=run: run(x)) for name, run in
                                  {"pytorch": eager, "onnxruntime": onnx_run, "torchscript": ts}.items()}, repeats)
        import onnx
        import onnxruntime

        result = {
            "model": str(model_path), "stage": ckpt.get("stage"), "classes": classes, "input_size": size,
            "arch": ckpt["arch"], "input": meta["input"], "output": meta["output"],
            "files": {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE},
            "bytes": {"onnx": onnx_tmp.stat().st_size, "torchscript": ts_tmp.stat().st_size,
                      "checkpoint": model_path.stat().st_size},
            "exporter": {"onnx": used["used"], "requested": exporter,
                         **({"failed": used["failed"]} if "failed" in used else {}),
                         "opset": used_opset, "torchscript": "torch.jit.trace"},
            "checked_on": checked_on, "n_checked": len(images), "tolerance": tolerance,
            "pytorch": {"top1": float((ref.argmax(1) == labels.numpy()).mean())} if labels is not None else {},
            **checks,
            "latency_ms_batch1": {**latency, "repeats": repeats, "threads": threads,
                                  "statistic": "median, runtimes taking turns in blocks of 10 calls",
                                  "load_average_1min": round(os.getloadavg()[0], 2), **load},
            "export_seconds": round(export_s, 2), "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
        }
        record.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")  # record is the temporary
    return result


def summary(r: dict, out: Path) -> str:
    lat = r["latency_ms_batch1"]
    rows = [f"exported {r['model']} ({r['arch']['name']}{', pruned' if r['arch'].get('pruned') else ''}, "
            f"{len(r['classes'])} classes) -> {out}/{{{ONNX_FILE}, {TORCHSCRIPT_FILE}, {EXPORT_JSON}}}",
            f"checked in fp32 on {r['checked_on']}, against model.pt in PyTorch eager (BatchNorm not folded):",
            f"  {'runtime':<13} {'max |logit diff|':>16} {'top-1 agreement':>16} {'top-1':>7} {'latency b=1':>12}"]
    top1 = lambda d: f"{d['top1']:.2%}" if "top1" in d else "-"  # noqa: E731
    rows.append(f"  {'pytorch':<13} {'(reference)':>16} {'':>16} {top1(r['pytorch']):>7} {lat['pytorch']:>9.3f} ms")
    for c, name in ((r["onnx"], "onnxruntime"), (r["torchscript"], "torchscript")):
        rows.append(f"  {name:<13} {c['max_abs_diff']:>16.3g} {c['top1_agreement']:>16.2%} {top1(c):>7} "
                    f"{lat[name]:>9.3f} ms")
    rows += [f"  (tolerance {r['tolerance']:g}; latency: median of {lat['repeats']} batch-1 calls each on "
             f"{lat['threads']} CPU thread(s), 1-min load average {lat['load_average_1min']}; ONNX opset "
             f"{r['exporter']['opset']}, {r['exporter']['onnx']} exporter)", *busy_note({"machine": lat}, "export")]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    stem = "" if args.model.stem == "model" else f"-{args.model.stem}"  # prune.pt and transfer.pt of one folder apart
    out = args.out or Path("outputs/export") / f"{args.model.resolve().parent.name}{stem}"
    check_untracked(out, "--out", "export")  # as dvc.yaml's export stage: its own folder
    if taken := [name for name in (ONNX_FILE, TORCHSCRIPT_FILE, EXPORT_JSON) if (out / name).is_dir()]:
        raise TransferkitError(f"cannot write {out / taken[0]}: it is a folder. Fix: move it away, or --out elsewhere.")
    export(args.model, out, args.test_set, tolerance=args.tolerance, repeats=args.repeats,
           batch_size=args.batch_size, exporter=args.exporter, opset=args.opset, threads=args.threads)
    return 0
