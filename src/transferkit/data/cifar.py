"""The official CIFAR-10/100 python version: checksum-verified download and a reader that
unpickles only what the official files hold."""

from __future__ import annotations

import hashlib
import math
import pickle
import socket
from pathlib import Path

import numpy as np
import torch

from transferkit.data.dataset import RawDataset, Split
from transferkit.errors import TransferkitError

# name -> (folder inside data_dir, train files, test files, meta file, label key, names key)
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def _official_md5s(name: str) -> dict[str, str]:
    """The checksums torchvision publishes for the extracted pickle files, meta file included."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    return {**{f: md5 for f, md5 in cls.train_list + cls.test_list}, cls.meta["filename"]: cls.meta["md5"]}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# What the official CIFAR pickles hold besides builtin containers, numbers and bytes: numpy arrays (an empty one
# from _reconstruct, given its dtype and bytes by its state; or _frombuffer's, protocol 5) and, in protocol-2
# files, bytes encoded through _codecs. The unpickler gives stand-ins for them, not numpy's own objects, whose
# states (a dtype's flags, an array's dtype) could make numpy read pixels as pointers; each checks what it is
# given, and an array becomes numpy's only once its bytes are known to fill it.
class _RefusedGlobal(pickle.UnpicklingError):
    """A global the official files never reference: loading it would run code."""


class _Guarded:
    """A callable the unpickler hands out: a pickle may set no state on it (a function's attributes, say)."""

    __slots__ = ("call", "name")

    def __init__(self, call, name: str):
        self.call, self.name = call, name

    def __call__(self, *args):
        return self.call(*args)

    def __setstate__(self, state):
        raise _RefusedGlobal(f"a state set on {self.name}")


class _Dtype:
    """numpy.dtype as numpy's pickles call it (('u1', False, True), then a state of its byte order): numbers only."""

    __slots__ = ("dtype",)

    def __init__(self, spec, *_):
        import numpy

        dtype = numpy.dtype(spec.decode() if isinstance(spec, bytes) else spec)  # Python 2's files: bytes
        if dtype.hasobject or dtype.kind not in "biuf":  # objects: Nones in any number; size 0: any shape fits
            raise _RefusedGlobal(f"numpy.dtype of {'Python objects' if dtype.hasobject else dtype.str}")
        self.dtype = dtype

    def __setstate__(self, state):  # (3, byte order, no fields, sizes -1, no flags): flags could mark objects
        plain = isinstance(state, tuple) and state[:1] + state[2:] == (3, None, None, None, -1, -1, 0)
        order = (state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]) if plain else None
        if order not in ("<", ">", "|", "="):
            raise _RefusedGlobal(f"numpy.dtype with the state {state!r:.80}")
        self.dtype = self.dtype.newbyteorder(order) if order in "<>" else self.dtype


class _Array:
    """An array to be: empty until its dtype, shape and bytes arrive, which must agree (no array larger than
    the bytes the file holds for it), and filled once."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def fill(self, dtype, shape, data, order: str = "C") -> _Array:
        import numpy

        if self.array is not None or not isinstance(dtype, _Dtype) or not isinstance(data, (bytes, bytearray)) or \
                not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise _RefusedGlobal("numpy array state that is not a number type, a shape and its bytes")
        if len(data) != math.prod(shape) * dtype.dtype.itemsize:
            raise _RefusedGlobal(f"numpy array of shape {shape} over {len(data)} bytes")
        self.array = numpy.frombuffer(bytearray(data), dtype.dtype).reshape(shape, order=order)
        return self

    def __setstate__(self, state):  # ndarray's: (version,) shape, dtype, Fortran order, bytes
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _RefusedGlobal("numpy array state that is not a number type, a shape and its bytes")
        shape, dtype, fortran, data = state[-4:]
        self.fill(dtype, shape, data, "F" if fortran else "C")


def _refuse_array_call(*_):
    raise _RefusedGlobal("numpy.ndarray directly (numpy's pickles name it only for _reconstruct, which makes it empty)")


def _empty_array(subtype, shape, _dtype):
    """numpy's _reconstruct as its pickles call it: (ndarray, (0,), b'b'), an array its state then fills."""
    if subtype is not _GLOBALS["numpy", "ndarray"] or not isinstance(shape, tuple) or 0 not in shape:
        raise _RefusedGlobal(f"numpy _reconstruct of a {shape!r} array")
    return _Array()


def _array_from_bytes(data, dtype, shape, order, axis_order=None):
    """numpy's _frombuffer (protocol 5): an array over bytes the file holds."""
    array = _Array().fill(dtype, shape, data, "C" if order == "K" else order)
    if order == "K" and axis_order is not None:
        array.array = array.array.transpose(axis_order)
    return array


def _latin1_encode(text, encoding: str = "utf-8", *_):
    """_codecs.encode as protocol-2 pickles of numpy arrays call it, text to latin-1 bytes of the same length: other
    codecs grow what they are given (hex doubles it, and twelve bytes of pickle nest another hex)."""
    import codecs

    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"_codecs.encode of {type(text).__name__} to {encoding}")
    return codecs.encode(text, "latin1")


_GLOBALS = {key: _Guarded(call, f"{key[0]}.{key[1]}") for keys, call in [
    ([("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")], _empty_array),
    ([("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")], _array_from_bytes),
    ([("numpy", "ndarray")], _refuse_array_call), ([("numpy", "dtype")], _Dtype),
    ([("_codecs", "encode")], _latin1_encode),
] for key in keys}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the official files hold, so a tampered file cannot call anything else.
    Hand-written because the format is a pickle: torch's weights-only loader reads torch files only."""

    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        raise _RefusedGlobal(f"{module}.{name}")


def _arrays(data, depth: int = 0):
    """`data` with each array stand-in as its numpy array, in the dict and the lists in it (the official layout)."""
    if isinstance(data, _Array):
        if data.array is None:
            raise _RefusedGlobal("numpy _reconstruct of an array no state filled")
        return data.array
    if depth < 2 and isinstance(data, dict):
        return {k: _arrays(v, depth + 1) for k, v in data.items()}
    if depth < 2 and isinstance(data, (list, tuple)):
        return type(data)(_arrays(v, depth + 1) for v in data)
    return data


def read_cifar_pickles(folder: Path, name: str, verify_checksums: bool = True) -> RawDataset:
    """Read the official python-pickle layout (what torchvision downloads and extracts)."""
    from transferkit.io import not_plain_data

    _, train_files, test_files, meta_file, label_key, names_key = CIFAR[name]
    md5s = _official_md5s(name) if verify_checksums else {}
    refetch = f"delete {folder} and extract the official archive again."

    def unpickle(fname: str) -> dict:
        path = folder / fname
        if not path.exists():
            raise TransferkitError(f"{path} is missing: the official {name} folder is incomplete. "
                                   f"Fix: re-extract the official archive into {folder.parent}.")
        try:
            digest = _md5(path) if fname in md5s else None
        except OSError as e:  # no permission, a file being replaced, a disk error
            raise TransferkitError(f"cannot read {path} ({e.strerror or e}). Fix: make it readable, or "
                                   f"{refetch}") from e
        if fname in md5s and digest != md5s[fname]:
            raise TransferkitError(
                f"{path} does not match the official {name} checksum: the file is corrupt or not "
                f"the official release. Fix: delete {folder} and download or extract it again "
                f"(or set data.verify_checksums=false for a deliberately modified copy).")
        try:
            with open(path, "rb") as f:
                data = _arrays(_CifarUnpickler(f, encoding="bytes").load())
        except _RefusedGlobal as e:
            raise not_plain_data(path, f"it calls {e}", refetch) from e
        except Exception as e:
            raise TransferkitError(f"{path} is not a readable CIFAR pickle ({e}). Fix: {refetch}") from e
        if not isinstance(data, dict):
            raise TransferkitError(f"{path} is not a CIFAR pickle (it holds a {type(data).__name__}, not a "
                                   f"dict). Fix: {refetch}")
        return data

    def field(batch: dict, key: bytes, fname: str):
        if key not in batch:
            raise TransferkitError(f"{folder / fname} has no {key.decode()!r} entry: it is not an official "
                                   f"{name} file. Fix: {refetch}")
        return batch[key]

    classes = class_names(field(unpickle(meta_file), names_key, meta_file), folder / meta_file, refetch)

    def split(files: list[str]) -> Split:
        images, labels = [], []
        for f in files:
            batch = unpickle(f)
            x, y = field(batch, b"data", f), field(batch, label_key, f)
            # every array is as large as the bytes the file holds for it (_empty_array, _array_from_bytes)
            if not isinstance(x, np.ndarray):
                raise TransferkitError(f"{folder / f} holds images that are not uint8 rows of 3072 bytes (32x32 RGB "
                                       f"planes) but a {type(x).__name__}. Fix: {refetch}")
            if not isinstance(y, (list, np.ndarray)) or isinstance(y, list) and not all(isinstance(v, (int, float))
                                                                                        for v in y):
                raise TransferkitError(f"{folder / f} has labels that are no flat list of numbers (each image needs "
                                       f"one label in 0..{len(classes) - 1}, its class's index). Fix: {refetch}")
            y = np.asarray(y)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise TransferkitError(f"{folder / f} holds images that are not uint8 rows of 3072 bytes (32x32 RGB "
                                       f"planes) but a {x.dtype} array of shape {x.shape}. Fix: {refetch}")
            images.append(x.reshape(-1, 3, 32, 32))
            # a label too few or too many shifts every later one onto another image
            fault = ("labels that are no flat list" if y.ndim != 1
                     else f"{len(y)} labels for {len(images[-1])} images" if len(y) != len(images[-1])
                     else "labels that are not integers" if len(y) and y.dtype.kind not in "iu"
                     else next((f"label {v}" for v in y[(y < 0) | (y >= len(classes))]), None))
            if fault:
                raise TransferkitError(f"{folder / f} has {fault} (each image needs one label in 0..{len(classes) - 1}"
                                       f", its class's index). Fix: {refetch}")
            labels.append(y.astype(np.int64))
        return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))  # copies

    return RawDataset(name, classes, split(train_files), split(test_files))


def class_names(names, path: Path, refetch: str) -> list[str]:
    """The meta file's class names: a list of distinct texts (a label is an index into it)."""
    fault = ("class names that are no list" if not isinstance(names, list)
             else "class names that are not text" if not all(isinstance(c, (bytes, str)) for c in names) else None)
    if fault is None:
        try:
            names = [c.decode() if isinstance(c, bytes) else c for c in names]
        except UnicodeDecodeError:
            fault = "class names that are not UTF-8 text"
        else:
            fault = next((f"class {c!r} twice" for i, c in enumerate(names) if c in names[:i]), None)
    if fault:
        raise TransferkitError(f"{path} has {fault}. Fix: {refetch}")
    return names


def download_cifar(name: str, data_dir: Path) -> None:
    """Fetch the official archive, verify its md5 and extract it. torchvision's download helper
    alone: its dataset classes would also unpickle the files, which read_cifar_pickles does safely."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an offline machine should fail in seconds, not hang
    try:
        download_and_extract_archive(cls.url, str(data_dir), filename=cls.filename, md5=cls.tgz_md5)
    finally:
        socket.setdefaulttimeout(old)
