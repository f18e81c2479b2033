"""What every stage shares: where its inputs and outputs live, seeding, and writing the
output folder so that a failed or killed run never replaces the previous good one."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from transferkit.errors import TransferkitError
from transferkit.training import RESUME_CHECKPOINT, first_process


def point_dir(freeze_curve_dir: Path, depth: int) -> Path:
    """Where freeze_curve keeps the run at one freeze depth (evaluate reads it there)."""
    return freeze_curve_dir / f"depth{depth}"


def load_task(prepare_dir: Path, role: str) -> dict:
    """The source or target task the prepare stage wrote into `prepare_dir`."""
    from transferkit.data.tasks import task_fault
    from transferkit.io import load_torch

    path = Path(prepare_dir) / f"{role}.pt"
    task = load_torch(path, f"prepared {role} task", "prepare")
    if fault := task_fault(task):  # a stage would crash on it mid-way, or train on the wrong data without a word
        raise TransferkitError(f"{path} is not a prepared task: {fault}. Fix: run the 'prepare' stage again "
                               f"(`dvc repro -s -f prepare`).")
    return task


PARAMS_FILE = "params.yaml"  # the resolved config a stage ran with, saved beside its outputs
RESUME_KEY = ".resume_key"  # in a work folder only: what else its resume checkpoints were trained from


def resume_key(inputs: Iterable[Path], params: str = "") -> str:
    """What a run trains from: its params, this package's code and the torch and Lightning it runs on, and each file
    it reads (the files of its input folders, and input files) by path, size and modification time (a file remade by
    an earlier stage is a new file, and no stage start has to read every input through a hash)."""
    import hashlib
    from importlib.metadata import version

    import transferkit

    versions = f"torch {version('torch')}, Lightning {version('pytorch-lightning')}"  # read, not imported
    digest, package = hashlib.sha256(f"{params}\0{versions}\0".encode()), Path(transferkit.__file__).parent
    for f in sorted(package.rglob("*.py")):
        digest.update(f"{f.relative_to(package).as_posix()}\0".encode() + f.read_bytes())
    files = (f for path in map(Path, inputs) for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file())
    for f in sorted(files):
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def own_folder(detail: str = "") -> str:
    """What names a stage's output folder, for a Fix: --out (and `detail`), or in a Hydra run (`transferkit STAGE
    key=value`, which has no --out) Hydra's own settings."""
    config = sys.modules.get("hydra.core.hydra_config")
    if "TRANSFERKIT_HYDRA_JOB" in os.environ or (config is not None and config.HydraConfig.initialized()):
        return "hydra.run.dir=DIR, or hydra.sweep.dir=DIR with -m"
    return f"--out DIR{detail}"


def check_replaceable(final: Path, inputs: Iterable[Path] = (), others: Iterable[Path] = ()) -> None:
    """The swap in staged_output deletes what `final` held: only a stage's earlier outputs (a folder
    with its PARAMS_FILE) may go, never a folder of other things (`--out artifacts`), one it reads,
    the current folder, a project (`--out .`: the project's own params.yaml is a PARAMS_FILE too) or
    the folder of another stage (`others`)."""
    target, here = final.resolve(), Path.cwd().resolve()
    fix = f"Fix: write them to a folder of their own ({own_folder()}, a new or empty folder)."
    if final.is_symlink():
        raise TransferkitError(f"the output folder {final} is a symbolic link (to {target}), and a stage installs its "
                               f"outputs by renaming a new folder into place, which would replace the link, not what "
                               f"it points to. Fix: pass the folder it points to ({target}) instead ({own_folder()}), "
                               f"or remove the link.")
    if target == here or target in here.parents:
        raise TransferkitError(f"the output folder {final} is or holds the current folder, and the stage's outputs "
                               f"would replace everything in it. {fix}")
    if project := [name for name in ("dvc.yaml", "conf", ".dvc", ".git") if (final / name).exists()]:
        raise TransferkitError(f"the output folder {final} holds a project ({', '.join(project)}), and the stage's "
                               f"outputs would replace all of it. {fix}")
    for folder in map(Path, inputs):
        if target == folder.resolve() or target in folder.resolve().parents:
            raise TransferkitError(f"the output folder {final} is or holds {folder}, which this stage reads, and the "
                                   f"stage's outputs would replace it. {fix}")
    # its folder, one inside it (its dvclive/ has a params.yaml too), or one that holds it (`--out artifacts`),
    # whether or not that stage has run yet
    for folder in map(Path, others):
        if target == folder.resolve() or folder.resolve() in target.parents or target in folder.resolve().parents:
            raise TransferkitError(f"the output folder {final} is, holds or is inside the {folder.name} stage's, and "
                                   f"this stage's outputs would replace what that stage writes there. {fix}")
    if final.exists() and not (final / PARAMS_FILE).is_file() and (not final.is_dir() or any(final.iterdir())):
        where = own_folder(": the stage's own folder, e.g. artifacts/<stage>")
        raise TransferkitError(f"the output folder {final} holds files no stage wrote (it has no {PARAMS_FILE}), "
                               f"and the stage's outputs would replace all of them. Fix: write them to a new or "
                               f"empty folder ({where}).")


@contextmanager
def exclusive(final: Path, why: str = "two runs of a stage at once would mix their training") -> Iterator[None]:
    """Held (rank 0's) while a run builds `final`, and by a sweep or scenarios run while it fills its folder. A second
    run of the stage beside it (another terminal, a run by hand beside `dvc repro`) would resume from the first one's
    live checkpoints and replace its logs mid-run; a second sweep would replace the first's dvc.yaml."""
    import fcntl  # POSIX: the lock goes with the process, however it ends
    import os

    if not first_process():
        yield
        return
    from transferkit.io import undone_on_failure

    with undone_on_failure(final.parent):  # a run refused or failed before its folder leaves no parent it made
        path = final.parent / f".{final.name}.lock"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path, "a+")
        except OSError:  # staged_output says what is wrong with the folder
            yield
            return
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise TransferkitError(f"another run (process {lock.read().strip() or '?'}) is writing {final}: {why}. "
                                       f"Fix: wait for it to end (or stop it), then run the command again.") from None
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            try:
                yield
            finally:  # removed while held: the folder keeps no trace of the run (a kill -9 leaves a file, unlocked)
                path.unlink(missing_ok=True)


@contextmanager
def staged_output(final: Path, params: str = "", inputs: Iterable[Path] = (), others: Iterable[Path] = (),
                  tracked: str | None = None) -> Iterator[Path]:
    """`_staged_output`, with no other run of the stage building `final` meanwhile (exclusive), once `final` may be
    replaced (check_replaceable, given the folders the stage reads and other stages' folders)."""
    inputs = list(inputs)
    check_replaceable(final, inputs, others)  # on every rank: a rank that went on alone would wait for rank 0
    with exclusive(final), _staged_output(final, params, inputs, tracked) as work:
        yield work


@contextmanager
def _staged_output(final: Path, params: str, inputs: list[Path], tracked: str | None) -> Iterator[Path]:
    """Yield a work folder; on success swap it into `final`, on failure delete it.

    The work folder starts with `params` (the resolved config) in PARAMS_FILE. A folder left by a
    killed run with the same `tracked` params (default: all of `params`), code and inputs (resume_key)
    and resume checkpoints is kept:
    its fits resume from them (training/trainer.py). Any other leftover is deleted: resuming it
    would mix two runs' training in one model. The folder name is the same in every
    DDP process, so ranks agree on paths; only rank 0 creates, swaps and cleans it."""
    work = final.parent / f".{final.name}.incomplete"
    old = final.parent / f".{final.name}.old"
    rank0 = first_process()
    if rank0:
        try:
            key = resume_key(inputs, params if tracked is None else tracked)
            # only fits resume: a leftover without their state could only add stale files
            resumable = ((work / RESUME_KEY).is_file() and (work / RESUME_KEY).read_text() == key
                         and fits_to_resume(work))
            if work.exists() and not resumable:  # left by a killed run of another config, code or input
                if fits_to_resume(work):  # its training is not resumed: said, as a damaged checkpoint is
                    print(f"{work} holds a stopped run's training with other settings, code or inputs than this "
                          f"run's: training from the start.", file=sys.stderr)
                shutil.rmtree(work)
            elif resumable:  # its fits resume; the files a kill -9 cut short are written again
                from transferkit.io import delete_half_written

                delete_half_written(work)
            if old.exists() and not final.exists():  # killed between the two renames below
                old.rename(final)
            work.mkdir(parents=True, exist_ok=True)
            if params:
                (work / PARAMS_FILE).write_text(params)
            (work / RESUME_KEY).write_text(key)
        except OSError as e:
            raise TransferkitError(f"cannot create {work}: {e.strerror}. Fix: make {final.parent} writable, or write "
                                   f"elsewhere (--out DIR; for the pipeline's stages, paths.artifacts_dir).") from e
    try:
        yield work
    except BaseException as e:
        # a failed run's folder goes, unless a fit in it can resume (Ctrl+C, a crash mid-training)
        resumable = rank0 and fits_to_resume(work)  # rank 0 alone: it deletes the folder, and says the line
        if rank0 and not resumable:
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):  # cli's Ctrl+C or SIGTERM line promises a resume only then
            e.resumes = resumable
        raise
    if not rank0:
        return
    (work / RESUME_KEY).unlink()  # the outputs are what they are: no longer a run to resume
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def fits_to_resume(work: Path) -> bool:
    """Whether a killed run's work folder holds fits' state: their checkpoints or, finished, their outputs (a point
    of freeze_curve, whose timing.json is written last)."""
    return any(work.rglob(RESUME_CHECKPOINT)) or any(work.glob("*/timing.json"))


@contextmanager
def storage_errors(final: Path) -> Iterator[None]:
    """Turn a full disk or an unwritable folder, wherever in a stage it strikes, into one
    message; staged_output has already removed the half-built folder by then."""
    try:
        yield
    except TransferkitError:
        raise
    except (OSError, RuntimeError) as e:
        from transferkit.io import disk_full

        denied = isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        if full := disk_full(e):
            raise TransferkitError(f"the disk is full: writing {final} failed ({full}). Fix: free disk space, or write "
                                   f"to a disk with room (--out DIR; for the pipeline's stages, paths.artifacts_dir); "
                                   f"the previous {final.name} outputs are intact.") from e
        if denied:
            raise TransferkitError(f"cannot write {getattr(e, 'filename', None) or final}: {e.strerror}. Fix: make "
                                   f"{final.parent} writable, or write elsewhere (--out DIR; for the pipeline's "
                                   f"stages, paths.artifacts_dir).") from e
        raise


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (every device), as Lightning's seed_everything
    does, without importing Lightning into the stages that do not train."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


OPTIMISER_KEYS = ("lr", "weight_decay", "momentum", "label_smoothing", "warmup_fraction", "warmup_from",
                  "decay_to", "bn_bias_lr_mult", "bn_bias_decay")


def train_settings(stage_cfg: DictConfig, seed: int) -> dict:
    """The optimisation block every training stage shares (conf/optim/), as ClassifierModule kwargs."""
    return {**{k: stage_cfg[k] for k in OPTIMISER_KEYS}, "seed": seed}


def data_settings(stage_cfg: DictConfig, seed: int) -> dict:
    """The block's augmentation, as TaskDataModule kwargs."""
    return {"flip": stage_cfg.flip, "translate": stage_cfg.translate, "seed": seed}


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def announce(line: str) -> None:
    """A stage's closing line: a Hydra app's job log keeps it beside Lightning's; a stage command (`--params`)
    configures no logging, and prints it."""
    log = logging.getLogger("transferkit")  # a library's logging.warning() gives the root a WARNING handler: not it
    log.info(line) if log.hasHandlers() and log.isEnabledFor(logging.INFO) else print(line)
