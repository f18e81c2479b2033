"""What every stage shares: where its inputs and outputs live, seeding, and writing the
output folder so that a failed or killed run never replaces the previous good one."""

from __future__ import annotations

import errno
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from transferkit.errors import TransferkitError


def global_rank() -> int:
    """This process's rank under DDP (set by Lightning's launcher, torchrun or SLURM); 0 alone."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            rank = int(os.environ[var])
            if var == "LOCAL_RANK":
                rank += int(os.environ.get("NODE_RANK", 0)) * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            return rank
    return 0


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """The DVC-tracked output folder of a stage (also where later stages read it)."""
    return Path(cfg.paths.artifacts_dir) / stage


@contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield a fresh work folder; on success swap it into `final`, on failure delete it.

    The folder name is the same in every DDP process, so ranks agree on paths; only rank 0
    creates, swaps and cleans it."""
    work = final.parent / f".{final.name}.incomplete"
    old = final.parent / f".{final.name}.old"
    rank0 = global_rank() == 0
    if rank0:
        try:
            if work.exists():  # left by a killed run
                shutil.rmtree(work)
            if old.exists() and not final.exists():  # killed between the two renames below
                old.rename(final)
            work.mkdir(parents=True)
        except OSError as e:
            raise TransferkitError(f"cannot create {work}: {e.strerror}. Fix: make {final.parent} "
                                   f"writable or set paths.artifacts_dir elsewhere.") from e
    try:
        yield work
    except BaseException:
        if rank0:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not rank0:
        return
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# How a full disk shows up: OSError from Python writes (dvclive, json), RuntimeError from
# torch.save's C++ writer (model and Lightning checkpoints).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "file write failed", "Disk quota exceeded")


@contextmanager
def storage_errors(final: Path) -> Iterator[None]:
    """Turn a full disk or an unwritable folder, wherever in a stage it strikes, into one
    message; staged_output has already removed the half-built folder by then."""
    try:
        yield
    except TransferkitError:
        raise
    except (OSError, RuntimeError) as e:
        full = (isinstance(e, OSError) and e.errno in _DISK_FULL) or any(t in str(e) for t in _DISK_FULL_TEXT)
        denied = isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        if full:
            raise TransferkitError(f"the disk is full: writing {final} failed ({e}). Fix: free disk space or set "
                                   f"paths.artifacts_dir to a disk with room; the previous {final.name} outputs "
                                   f"are intact.") from e
        if denied:
            raise TransferkitError(f"cannot write {getattr(e, 'filename', None) or final}: {e.strerror}. Fix: make "
                                   f"{final.parent} writable or set paths.artifacts_dir elsewhere.") from e
        raise


def seed_everything(seed: int) -> None:
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True, verbose=False)


def train_settings(stage_cfg: DictConfig) -> dict:
    """The optimisation block every training stage shares, as ClassifierModule kwargs."""
    keys = ("lr", "weight_decay", "momentum", "label_smoothing", "warmup_fraction", "flip", "translate")
    return {k: stage_cfg[k] for k in keys}


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
