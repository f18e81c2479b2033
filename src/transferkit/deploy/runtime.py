"""One interface over every kind of model file the project produces, for `predict` and
`export`: a pipeline checkpoint (`model.pt`, any stage, pruned included), an exported ONNX
file or an exported TorchScript file. Each takes float32 NCHW RGB images in [0, 1] (uint8 / 255)
and returns logits; normalisation is inside the model."""

from __future__ import annotations

import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from transferkit.data.memory import memory_limit
from transferkit.deploy.graph import control_flow, final_op
from transferkit.deploy.sessions import bounded_arena, ort_session
from transferkit.errors import TransferkitError
from transferkit.layout import to_nhwc
from transferkit.plain import plain_json

EXPORT_JSON = "export.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
# written into the ONNX file's metadata_props and the TorchScript file's extra files, so either
# file alone is enough to classify images (export.json beside it says the same)
META_KEY = "transferkit"


# what stage_of says when the path does not name the stage that wrote the file
UNKNOWN_STAGE = "<stage>"
# a file's own word on its input, bounded: predict allocates for it before running a single image
MAX_FIXED_BATCH = 256  # predict's batch: a file fixed at more would be padded up to it on every call
INPUT_SIZES = range(8, 1025)  # pixels a side: CIFAR's 32 to well past ImageNet's 224
# a file's graph may build tensors its bytes do not pay for (ConstantOfShape, broadcasts): ONNX Runtime allocates
# within sessions.bounded_arena(), and the first two images may take this long (a classifier takes a fraction of a
# second)
PROBE_SECONDS = 60.0


def stage_of(path: Path) -> str:
    """The stage that wrote artifacts/<stage>/model.pt or artifacts/<stage>/<point>/model.pt
    (freeze_curve/depthK), for error messages; UNKNOWN_STAGE for a path that names no stage."""
    from transferkit.stages import STAGES

    return next((p.name for p in (path.parent, path.parent.parent) if p.name in STAGES), UNKNOWN_STAGE)


def is_zip(path: Path) -> bool:
    """torch.save and TorchScript files are zip archives; an ONNX file is a protobuf, which never begins so."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:  # unreadable: the loader names it
        return False


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with code/ and constants.pkl; torch.save files are
    zip files without them."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def not_a_file(path: Path, fix: str, names: tuple[str, ...] = ("model.pt",)) -> TransferkitError:
    """A model path that names no file: a folder (a stage's, say) gets the model file in it as the fix,
    the first of `names` (the files the command reads) that it holds."""
    if path.is_dir():
        if found := [name for name in names if (path / name).is_file()]:
            return TransferkitError(f"model {path} is a folder. Fix: pass the model file in it ({path / found[0]}).")
        return TransferkitError(f"model {path} is a folder, with no {' or '.join(names)} in it. Fix: {fix}")
    return TransferkitError(f"model {path} not found. Fix: {fix}")


def load_pipeline_checkpoint(path: Path):
    """`load_checkpoint` with messages for a missing file and for files that are no checkpoint."""
    from transferkit.models import load_checkpoint

    path = Path(path)
    produced_by = stage_of(path)
    if not path.is_file():
        remake = ("" if produced_by == UNKNOWN_STAGE or path.is_dir()
                  else f"`dvc repro {produced_by}` writes this one, or ")
        raise not_a_file(path, f"{remake}pass a model.pt that a stage wrote, e.g. artifacts/prune/model.pt "
                               f"(`dvc repro prune` makes it).")
    if is_torchscript(path):
        raise TransferkitError(
            f"{path} is a TorchScript file, not a transferkit checkpoint. Fix: pass the model.pt a stage "
            f"wrote (artifacts/<stage>/model.pt); `transferkit predict --trust-code` takes this file, if you made it.")
    with open(path, "rb") as f:  # torch.save writes zip archives: anything else is foreign (a cut-off
        head = f.read(4)  # or empty one is damaged, and load_checkpoint says which stage remakes it)
    if len(head) == 4 and head != b"PK\x03\x04":
        onnx = path.suffix.lower() == ".onnx"  # given to export (predict reads an ONNX file as one)
        what = "an ONNX file: an export already" if onnx else "not a file written by torch.save"
        raise TransferkitError(
            f"{path} is not a transferkit checkpoint ({what}). Fix: pass the model.pt a stage wrote, e.g. "
            f"artifacts/prune/model.pt{'' if onnx else ' (an ONNX model is read by its name: *.onnx)'}.")
    model, ckpt = load_checkpoint(path, produced_by, remake=None if produced_by != UNKNOWN_STAGE else
                                  "write it again with the stage that made it, or pass a model.pt that a stage "
                                  "wrote, e.g. artifacts/prune/model.pt")
    return model.eval(), ckpt


class Classifier:
    """Any model file -> logits for float32 [N, 3, S, S] images in [0, 1].

    model.pt files are read as plain data and ONNX files by ONNX Runtime, so neither can run
    code. A TorchScript file is a program: it is loaded only with `trust_code=True`."""

    def __init__(self, path: str | Path, threads: int | None = None, trust_code: bool = False):
        self.path = Path(path)
        threads = threads or torch.get_num_threads()
        shape = []  # an ONNX graph's input shape: numbers or names (any size)
        self.meta_source = "its metadata"  # where the class names and input size come from (_metadata)
        self.fixed_batch: int | None = None  # the images per run a file takes exactly (None: any number)
        if not self.path.is_file():
            raise not_a_file(self.path, f"pass a model.pt a stage wrote (artifacts/<stage>/model.pt) or a model.onnx "
                                        f"/ {TORCHSCRIPT_FILE} from `transferkit export`.",
                             ("model.onnx", "model.pt", TORCHSCRIPT_FILE))
        if self.path.suffix.lower() == ".onnx" and not is_zip(self.path):  # a model.pt renamed: read as one
            self.kind = "onnx"
            self.session = ort_session(self.path, threads)
            if loop := control_flow(self.path):
                raise TransferkitError(f"{self.path}'s graph has a {loop} node: a loop whose length the file sets, "
                                       f"which no classifier transferkit exports has. Fix: export the model again "
                                       f"(`transferkit export MODEL.pt`).")
            info = self._metadata(self.session.get_modelmeta().custom_metadata_map.get(META_KEY))
            import onnxruntime as ort

            self._run_options = ort.RunOptions()
            self._run_options.log_severity_level = 4  # as the session's: a failed run is one error line
            # a file that ends in Softmax gives probabilities: their logs are logits that give them back
            self._probabilities = final_op(self.path) == "Softmax"
            inp = self.session.get_inputs()[0]
            if inp.type != "tensor(float)":
                raise TransferkitError(f"{self.path} takes {inp.type} input, not float32 images in [0, 1] as "
                                       f"transferkit's exports do. Fix: export the model again "
                                       f"(`transferkit export MODEL.pt`).")
            # a file exported without a dynamic batch axis takes batches of exactly its traced size
            self._input, self.fixed_batch = inp.name, inp.shape[0] if isinstance(inp.shape[0], int) else None
            shape = inp.shape
            if (n := self.fixed_batch) is not None and not 1 <= n <= MAX_FIXED_BATCH:
                raise TransferkitError(f"{self.path} takes batches of exactly {n} images, outside the 1 to "
                                       f"{MAX_FIXED_BATCH} predict runs at once (it pads each batch up to a fixed "
                                       f"size). Fix: export the model again (`transferkit export MODEL.pt` writes a "
                                       f"dynamic batch axis).")
        elif is_torchscript(self.path):
            if not trust_code:
                raise TransferkitError(
                    f"{self.path} is a TorchScript file: a program, which loading would run, not plain data. "
                    f"Fix: classify with the model.onnx or model.pt instead, or pass --trust-code if you "
                    f"exported this file yourself.")
            self.kind = "torchscript"
            extra = {META_KEY: ""}
            try:
                with warnings.catch_warnings():  # torch.jit is deprecated upstream; the format still loads
                    warnings.simplefilter("ignore", FutureWarning)
                    self.module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra).eval()
            except Exception as e:
                raise TransferkitError(f"{self.path} is not a readable TorchScript model ({e}). "
                                       f"Fix: export it again (`transferkit export MODEL.pt`).") from e
            info = self._metadata(extra[META_KEY])
        else:
            self.kind = "pytorch"
            self.module, ckpt = load_pipeline_checkpoint(self.path)
            # this object only runs the model, never saves it: channels_last for good (transferkit/layout.py)
            self.module.to(memory_format=torch.channels_last)
            info = {"classes": list(ckpt["classes"]), "input_size": int(self.module.input_size)}
        self.classes: list[str] = list(info["classes"])
        self.input_size: int = int(info.get("input_size", 32))
        # the fix for a file that is not what its maker wrote, or that its maker wrote wrong
        self.remake = ("Fix: write it again with the stage that made it (`dvc repro STAGE`)." if self.kind == "pytorch"
                       else "Fix: export the model again (`transferkit export MODEL.pt`).")
        # a name is printed one result per line: a line break or a terminal escape in it would forge results
        if odd := [c for c in self.classes if not (isinstance(c, str) and c.isprintable() and len(c) <= 200)][:3]:
            raise TransferkitError(f"{self.path} names classes that are no printable names of at most 200 characters "
                                   f"({', '.join(ascii(c)[:60] for c in odd)}). {self.remake}")
        if len(set(self.classes)) < max(2, len(self.classes)):  # what prepare makes: two or more, each once
            raise TransferkitError(f"{self.path} names {len(self.classes)} class{'es' * (len(self.classes) != 1)} "
                                   f"{self.classes[:5]}, not two or "
                                   f"more distinct ones as every model transferkit trains has. {self.remake}")
        size, named = self.input_size, (f"{self.meta_source} names" if "input_size" in info else
                                        f"assumed where {self.meta_source} names no size")
        if size not in INPUT_SIZES:
            raise TransferkitError(f"{self.path} takes {size}x{size} images, the size {named}, outside the "
                                   f"{INPUT_SIZES[0]} to {INPUT_SIZES[-1]} pixels a side predict reads. {self.remake}")
        # predict pads each run up to a fixed batch in numpy, outside ONNX Runtime's bounded arena
        if (n := self.fixed_batch) and (need := n * 3 * size * size * 4) > (limit := memory_limit()):
            raise TransferkitError(f"{self.path} takes batches of exactly {n} {size}x{size} images, {need / 2**30:.1f} "
                                   f"GiB of pixels a run, more than the {limit / 2**30:.1f} GiB predict may take "
                                   f"here. {self.remake}")
        if any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (3, size, size))):
            raise TransferkitError(f"{self.path}'s graph takes input of shape {list(shape)}, not the [N, 3, {size}, "
                                   f"{size}] images {named}. {self.remake}")
        # ONNX Runtime ends a run whose terminate flag is set, between two of its nodes
        timer = threading.Timer(PROBE_SECONDS, setattr, (getattr(self, "_run_options", None), "terminate", True))
        if self.kind == "onnx":
            timer.start()
        try:  # two images of that size through the model: the class names must match its outputs, row by row
            logits = self(np.zeros((2, 3, size, size), np.float32))
        except TransferkitError:
            raise
        except Exception as e:  # ONNX Runtime and TorchScript raise their own types for a wrong input shape
            if timer.finished.is_set() or "bfc_arena" in str(e):  # past sessions.py's memory bound
                took = (f"over {PROBE_SECONDS:.0f} s" if timer.finished.is_set() else
                        f"more than the {bounded_arena() / 2**30:.1f} GiB of memory ONNX Runtime may take here")
                raise TransferkitError(f"{self.path} took {took} to score two {size}x{size} images, where a "
                                       f"classifier takes a fraction of a second and a few MB: its graph does work "
                                       f"its file size does not show. {self.remake}") from e
            why = ": its weights do not fit together (altered or damaged)" if self.kind == "pytorch" else ""
            raise TransferkitError(f"{self.path} does not take the {size}x{size} images {named} "
                                   f"({' '.join(str(e).split())[:300]}){why}. {self.remake}") from e
        finally:
            timer.cancel()
        if self.kind == "onnx":  # a timer that fired as the run ended would end the next
            self._run_options.terminate = False
        self.check_finite(logits[:1], ["a black image"])  # the two rows score one image
        width = logits.shape[-1]
        if width != len(self.classes):
            raise TransferkitError(f"{self.path} scores {width} classes, and its metadata names {len(self.classes)} "
                                   f"({self.classes}). Fix: export the model again (`transferkit export MODEL.pt`).")

    def _metadata(self, text: str | None) -> dict:
        """The class names and input size an exported file carries, or the export.json beside it."""
        source, self.meta_source = f"{self.path}'s {META_KEY} metadata", "its metadata"
        fix = "Fix: export the model again (`transferkit export MODEL.pt`)."
        if not text:
            source, self.meta_source = self.path.parent / EXPORT_JSON, f"the {EXPORT_JSON} beside it"
            if not source.is_file():
                raise TransferkitError(
                    f"{self.path} carries no class names and there is no {EXPORT_JSON} beside it. "
                    f"Fix: keep the {EXPORT_JSON} that `transferkit export` wrote next to the model file, "
                    f"or export again.")
            try:
                text = source.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise TransferkitError(f"{source} is unreadable ({e}). {fix}") from e
        try:
            info = plain_json(text)
        except ValueError as e:
            raise TransferkitError(f"{source} is damaged ({e}). {fix}") from e
        if not (isinstance(info, dict) and isinstance(info.get("classes"), list)
                and all(isinstance(c, str) for c in info["classes"]) and type(info.get("input_size", 32)) is int):
            raise TransferkitError(f"{source} is not what `transferkit export` writes (class names and an input "
                                   f"size). {fix}")
        return info

    def check_finite(self, logits: np.ndarray, names: list[str]) -> None:
        """Refuses scores that overflowed or divided by zero (an input std of 0): their probabilities are NaN.
        `names`: what each row of `logits` scored, for the message."""
        bad = [name for name, finite in zip(names, np.isfinite(logits).all(1)) if not finite]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TransferkitError(f"{self.path} scores {shown} as NaN or infinity: its weights or input scaling "
                                   f"are broken. {self.remake}")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] in [0, 1] -> float32 logits [N, classes]."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.kind == "onnx":
            def run(x: np.ndarray) -> np.ndarray:
                out = self._scores(self.session.run(None, {self._input: x}, self._run_options)[0], len(x))
                return np.log(np.maximum(out, np.finfo(np.float32).tiny)) if self._probabilities else out

            if (n := self.fixed_batch) in (None, len(images)):
                return run(images)
            pad = -len(images) % n if len(images) else n  # at least one run: the output's width
            padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
            return np.concatenate([run(padded[i:i + n]) for i in range(0, len(padded), n)])[:len(images)]
        x = torch.from_numpy(images)
        with torch.inference_mode():
            out = self.module(to_nhwc(x) if self.kind == "pytorch" else x)
        return self._scores(out.float().numpy() if torch.is_tensor(out) else out, len(images))

    def _scores(self, out, n: int) -> np.ndarray:
        """A model's output as float32 logits [n, classes]; anything else (another shape, text, rows that pool the
        batch, so that images would go missing from the results) is refused."""
        if not (isinstance(out, np.ndarray) and out.ndim == 2 and len(out) == n
                and (np.issubdtype(out.dtype, np.floating) or np.issubdtype(out.dtype, np.integer))):
            what = f"{out.dtype} of shape {tuple(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
            raise TransferkitError(f"{self.path} returns {what} for {n} image(s), not one row of class scores per "
                                   f"image. {self.remake}")
        return out.astype(np.float32, copy=False)


def require_classes(path: Path, classes: list[str], produced_by: str) -> None:
    """An exported model scores exactly the task's classes, in its order, by the names the file carries: the check
    load_checkpoint makes of a model.pt (another task's file would be scored against this task's labels)."""
    if (named := Classifier(path, threads=1).classes) != list(classes):
        raise TransferkitError(f"{path} was exported from a model of classes {named}, but the target task is "
                               f"{list(classes)}. Fix: rerun '{produced_by}' on this task (`dvc repro {produced_by}`).")
