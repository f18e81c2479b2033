"""Atomic file writes: a stage that fails half-way never leaves a half-written file
where a later stage (or DVC) would read it. Everything is written to a temporary
sibling first and renamed into place, which is atomic on POSIX filesystems."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from transferkit.errors import NotPlainData, TransferkitError
from transferkit.plain import plain_json


_UMASK = os.umask(0)
os.umask(_UMASK)
# How a full disk shows up: OSError from Python writes, RuntimeError from torch.save's C++ writer.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "file write failed", "Disk quota exceeded")


def disk_full(e: BaseException | None) -> BaseException | None:
    """The error in `e`'s chain that says the disk is full (torch's zip writer reports the OSError it got as "unexpected
    pos", with the OSError as its context); None where none does."""
    for _ in range(8):  # a chain is short; a cycle is not followed for ever
        if e is None:
            return None
        if (isinstance(e, OSError) and e.errno in _DISK_FULL) or \
                (isinstance(e, (OSError, RuntimeError)) and any(t in str(e) for t in _DISK_FULL_TEXT)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _cannot_write(folder: Path, e: OSError) -> TransferkitError:
    if e.errno == errno.ENAMETOOLONG:  # the file's name, not the folder: most file systems hold 255 bytes a name
        return TransferkitError(f"cannot write {e.filename or folder}: {e.strerror}. Fix: give it a shorter name (a "
                                f"sweep names each point by the overrides given: give fewer, and set constant ones "
                                f"with `transferkit params KEY=VALUE`).")
    problem = "a file stands where the folder would be" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror
    return TransferkitError(f"cannot write to {folder}: {problem}. Fix: make it a writable folder, or write elsewhere "
                            f"(--out DIR; for the pipeline's stages, paths.artifacts_dir).")


def make_folder(folder: Path) -> None:
    """`folder`, made and written to once, before the work whose outputs go there: else one error, at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a read-only file system, a folder of another user's
    except OSError as e:
        raise _cannot_write(folder, e) from e


def to_disk(path: Path, flags: int = os.O_RDWR) -> None:
    """fsync a file's bytes (opened for writing: Windows flushes only that), or with O_RDONLY a folder's entries."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete_half_written(folder: Path) -> None:
    """Delete the temporaries atomic_path left under `folder` when a kill -9 cut their writes short."""
    for tmp in folder.rglob(".*.tmp"):  # the names atomic_path gives them
        tmp.unlink(missing_ok=True)


@contextmanager
def undone_on_failure(folder: Path, files: tuple[str, ...] = ()) -> Iterator[None]:
    """Where the block fails, the folders up to `folder` that it made go again, once empty (`files`: its own in
    `folder`, removed first): a failed command leaves no folder of its own behind (an empty --out)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for name in files if made else ():
            with contextlib.suppress(OSError):  # a file stands on the path: nothing was made there
                (folder / name).unlink()
        for p in made:
            with contextlib.suppress(OSError):  # one that holds something else now stays
                p.rmdir()
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (`.NAME.XXXX.tmp`, delete_half_written's); rename it onto `path`
    only on success."""
    path = Path(path)
    with undone_on_failure(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        except OSError as e:
            raise _cannot_write(path.parent, e) from e
        tmp = Path(tmp)
        try:
            yield tmp
            try:
                to_disk(tmp)  # else a power cut after the rename can leave an empty file where the old one was
                os.replace(tmp, path)
                with contextlib.suppress(OSError):  # the rename itself, where the folder opens: not on Windows,
                    to_disk(path.parent, os.O_RDONLY)  # nor for a user who may write to it but not read it
            except OSError as e:
                if not disk_full(e):  # a folder standing at `path`, a read-only file system, ...
                    raise TransferkitError(f"cannot write {path}: {e.strerror or e}. Fix: move away what stands "
                                           f"there, or write elsewhere (--out DIR).") from e
                raise
        except (OSError, RuntimeError) as e:
            if full := disk_full(e):
                raise TransferkitError(f"the disk is full: writing {path} failed ({full}). Fix: free disk space; "
                                       f"the previous {path.name} (if any) is untouched.") from e
            raise
        finally:
            tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | Path) -> None:
    # through a file object, not the temporary's name: torch names the zip's root folder after
    # the file it is given, so saving by name would put the random temporary name into the
    # bytes and the same weights would hash differently on every run (DVC, check-repro)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def not_plain_data(path: str | Path, detail: str, fix: str) -> NotPlainData:
    """The one message for a file that would need code to load (a foreign or tampered pickle)."""
    return NotPlainData(
        f"{path} is not plain data: loading it would run code from the file ({detail}), so it was "
        f"refused and nothing in it ran. transferkit reads only tensors, numbers, strings, lists and "
        f"dicts. Fix: {fix}")


def _unpickling_detail(e: Exception) -> str:
    """The part of torch's weights-only refusal that names the offending global, or the problem."""
    text = str(e)
    marker = "Unsupported global:"
    if marker in text:
        return text[text.index(marker):].split(" was not an allowed", 1)[0].replace("GLOBAL ", "")
    # a module torch blocks outright: "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
    if named := [line.strip().rstrip(".") for line in text.splitlines() if " GLOBAL " in line]:
        return named[0].replace("GLOBAL ", "")[:200]
    marker = "WeightsUnpickler error:"  # the unpickler's own words, between torch's advice
    lines = [line.strip() for line in text.split(marker, 1)[-1].splitlines() if line.strip()]
    return lines[0 if marker in text else -1][:200] if lines else type(e).__name__


def load_plain(path: str | Path, fix: str, what: str = "") -> Any:
    """torch.load restricted to plain data (weights_only=True): tensors, numbers, strings,
    lists, dicts. A file holding anything else is refused before any of it runs; a damaged one
    is reported as unreadable (`what` names it in the message)."""
    subject = f"{what} at {path}" if what else str(path)
    if problem := _inflating_records(path):
        raise TransferkitError(f"{subject} {problem}, which torch.save never writes: reading it would take memory "
                               f"the file does not hold. Fix: {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(e)
        # the refusals that name a global, a class or a function to call: what a pickle would run
        if any(word in str(e) for word in ("GLOBAL", "allowlisted", "reduce")):
            raise not_plain_data(path, detail, fix) from e
        raise TransferkitError(f"{subject} is unreadable: damaged, or not a file PyTorch wrote ({detail}). "
                               f"Fix: {fix}") from e
    except Exception as e:  # truncated or foreign: torch raises many types
        raise TransferkitError(f"{subject} is unreadable: damaged, cut off, or not a file PyTorch wrote "
                               f"({type(e).__name__}: {e}). Fix: {fix}") from e


def _inflating_records(path: str | Path) -> str | None:
    """What in a zip (torch.save's format) would expand beyond the file's own size, or None: torch.load inflates
    compressed records and reads every record at the size its entry claims."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):  # no zip, or a damaged one: torch.load says which
        return None
    if any(r.compress_type != zipfile.ZIP_STORED for r in records):
        return "holds compressed records"
    # stored records hold their bytes once each: entries that share bytes claim more than the file has
    if (total := sum(r.file_size for r in records)) > (size := os.path.getsize(path)):
        return f"holds records that add up to {total:,} bytes, more than its {size:,}"
    return None


@contextmanager
def quiet_output() -> Iterator[None]:
    """Standard output and error, as file descriptors, into a discarded file while the block runs: what a library
    prints from C++ or through its own logger (the ONNX exporters' graphs and tracebacks) bypasses sys.stdout."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def require(path: str | Path, what: str, produced_by: str) -> Path:
    """`path`, which an earlier stage writes: where it is missing, one error naming that stage."""
    if not (path := Path(path)).exists():
        # a project's relative paths, read from one of its subfolders (docs/), not from a runs folder (dvc.yaml)
        here, markers = Path.cwd().resolve(), ("conf/config.yaml", "dvc.yaml")
        project = next((d for d in here.parents if (d / markers[0]).is_file()), None)
        if not path.is_absolute() and project and (project / path).exists() and not any(
                (here / f).is_file() for f in markers):
            raise TransferkitError(f"{what} not found at {path}, read from {here}, a folder inside the project "
                                   f"{project}, whose paths are relative to its own folder. Fix: run it from "
                                   f"{project}.")
        run = f"run the '{produced_by}' stage first (`dvc repro {produced_by}`)"
        if path.parent.name == produced_by and path.parent.parent.resolve() != Path("artifacts").resolve():
            run = (f"run the '{produced_by}' stage first into {path.parent} (`transferkit {produced_by}` with the same "
                   f"paths.artifacts_dir; `dvc repro {produced_by}` fills the project's own folder)")  # a Hydra run's
        if path.parent.is_dir() and any(path.parent.iterdir()):  # a folder of another stage's (--in), or a stale one
            run = f"give the folder the '{produced_by}' stage wrote (--in {produced_by}=DIR), or {run}"
        raise TransferkitError(f"{what} not found at {path}. Fix: {run}.")
    return path


def load_torch(path: str | Path, what: str, produced_by: str, remake: str | None = None) -> Any:
    """Load a file a previous stage wrote, with an error that says which stage to run (or, for a
    file the user names, `remake`: how to write one)."""
    path = require(path, what, produced_by)
    # -s: -f alone would rerun every stage before it too
    rerun = (f"{remake}." if remake
             else f"delete it and rerun the '{produced_by}' stage (`dvc repro -s -f {produced_by}`).")
    return load_plain(path, f"do not use this file; {rerun}", what)


def load_json(path: str | Path, produced_by: str, optional: bool = False) -> dict | None:
    """A JSON object a previous stage wrote (None where `optional` and missing), with an error that says
    which stage to run where it is missing, damaged or not an object."""

    path = Path(path)
    if optional and not path.exists():
        return None
    rerun = f"run the '{produced_by}' stage again (`dvc repro -s -f {produced_by}`)."
    try:
        data = plain_json(path.read_text())
    except (OSError, ValueError) as e:
        raise TransferkitError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}). Fix: {rerun}") from e
    if not isinstance(data, dict):
        raise TransferkitError(f"{path} holds a {type(data).__name__}, not the object the '{produced_by}' stage "
                               f"writes. Fix: {rerun}")
    return data
