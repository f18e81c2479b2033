"""Build a Lightning Trainer from the `trainer` config group and fit a module: accelerator, devices, strategy, nodes
and precision come only from config, so the same stage code runs on a CPU, a GPU, or DDP over many processes.

A fit that is killed resumes: `ResumeCheckpoint` saves the training state (and a copy of the logs as they were then)
at epoch ends, as often as a budget of the training time allows, and `fit` picks it up when the stage runs again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Checkpoint, LearningRateMonitor, TQDMProgressBar
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.plugins.environments import LightningEnvironment
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from transferkit.errors import NotPlainData, TransferkitError
from transferkit.io import to_disk
from transferkit.models.blocknet import BlockNet
from transferkit.progress import bars_disabled
from transferkit.training import RESUME_CHECKPOINT, first_process
from transferkit.training.hooks import NoProfiler, no_empty_hooks
from transferkit.training.loggers import copy_logs, make_loggers, resume_csv
from transferkit.training.precision import resolve_precision
from transferkit.training.ranks import DieOnSigterm, ended_rank

# Lightning warnings that are about choices made on purpose here:
warnings.filterwarnings("ignore", r".*module\(s\) in eval mode.*")  # frozen blocks stay in eval mode
warnings.filterwarnings("ignore", r".*smaller than the logging interval.*")  # tiny smoke datasets
warnings.filterwarnings("ignore", r".*Total length of .* across ranks is zero.*")  # no val split (pretrain)
warnings.filterwarnings("ignore", r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")  # Lightning vs torch 2.15
# under DDP: the epoch's sums are reduced across processes before they are logged (ClassifierModule._log_sums)
warnings.filterwarnings("ignore", r".*It is recommended to use `self.log\(.*sync_dist=True\)`.*")


class _DropMessages(logging.Filter):
    """Lightning's info lines that say nothing about this run, or what the stage's own lines say: an advertisement, a
    note on the default of save_checkpoint's weights_only (the resume checkpoint saves all state), the data loaded to
    count the steps the schedule needs, that training ended as planned; accelerators no stage uses, the precision
    (the closing line's), a resume ("resumed after epoch N of M"), Ctrl+C (the command's "interrupted" line) and
    a rank that ended (the command's error line: training/ranks.py). Where it trains (GPU available: ...) stays."""

    DROPPED = ("💡 Tip", "`weights_only` was not set", "Loading `train_dataloader` to estimate",
               "`Trainer.fit` stopped: `max_epochs=", "TPU available:", "HPU available:",
               "Using bfloat16 Automatic Mixed Precision", "Using 16bit Automatic Mixed Precision",
               "Restoring states from the checkpoint", "Restored all states", "\nDetected KeyboardInterrupt",
               "[rank: ")  # the launcher's observer thread: "[rank: 1] Child process with PID ... terminated"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.DROPPED)


for _name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.trainer.connectors.checkpoint_connector",
              "lightning_fabric.utilities.rank_zero", "lightning_fabric.strategies.launchers.subprocess_script"):
    logging.getLogger(_name).addFilter(_DropMessages())

TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "deterministic", "sync_batchnorm", "benchmark")
CHECKPOINTS = Path("checkpoints")  # a pair: the training state and the logs as they were at its epoch
CHECKPOINT, LOG_SNAPSHOT = CHECKPOINTS / RESUME_CHECKPOINT, CHECKPOINTS / "logs"
# the next pair is made beside it and swapped in by renames: at every moment one folder holds a whole pair
NEXT, PREVIOUS = Path("checkpoints.next"), Path("checkpoints.previous")


def resume_folder(out_dir: Path) -> Path | None:
    """The folder of a whole pair, if a killed run left one: checkpoints/, or its neighbour mid-swap."""
    for folder in (CHECKPOINTS, PREVIOUS, NEXT):  # NEXT gets its state file last, once its logs are whole
        if (out_dir / folder / RESUME_CHECKPOINT).is_file() and (out_dir / folder / "logs").is_dir():
            return out_dir / folder
    return None


class ResumeCheckpoint(Checkpoint):
    """Saves the training state at an epoch end whenever the time spent saving so far, plus the expected cost of this
    save, stays within `budget` x the training time: a slow epoch is checkpointed every time, fast ones (a GPU, a tiny
    model) only now and then. budget 0 never saves, 1 saves every epoch. The state goes to a temporary file in
    checkpoints.next/; at the next epoch's start, once the loggers have written that epoch's metrics, a copy of the
    logs joins it and the folder replaces checkpoints/ by renames, so a kill at any moment leaves one whole pair."""

    def __init__(self, out_dir: Path, budget: float):
        self.out_dir, self.budget = out_dir, budget
        self.pending: Path | None = None
        self.committer = CommitCheckpoint(self)

    def on_train_start(self, trainer, module) -> None:
        self.start, self.spent = time.perf_counter(), 0.0
        # before the first save, assume a slow disk: state (weights, momentum) at 200 MB/s
        self.expected = 2 * sum(p.numel() * p.element_size() for p in module.parameters()) / 200e6

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.budget <= 0 or trainer.current_epoch + 1 >= trainer.max_epochs:
            return  # no checkpoint after the last epoch: training is over
        elapsed = time.perf_counter() - self.start
        due = self.budget >= 1 or self.spent + self.expected <= self.budget * elapsed
        if not trainer.strategy.broadcast(due):  # every rank decides as rank 0 does
            return
        t = time.perf_counter()
        if trainer.global_rank == 0:  # the others' save_checkpoint writes nothing: they never touch the files
            if resume_folder(self.out_dir) == self.out_dir / NEXT:  # the pair this run resumed from: kept whole
                (self.out_dir / NEXT).rename(self.out_dir / CHECKPOINTS)
            shutil.rmtree(self.out_dir / NEXT, ignore_errors=True)
        self.pending = self.out_dir / NEXT / "state.tmp"
        trainer.save_checkpoint(self.pending)  # the whole state (optimiser, schedule, loops): a resume
        self.expected = time.perf_counter() - t
        self.spent += self.expected

    def commit(self, trainer) -> None:
        if self.pending is None or trainer.global_rank != 0:
            self.pending = None
            return
        t = time.perf_counter()
        current, following, previous = (self.out_dir / f for f in (CHECKPOINTS, NEXT, PREVIOUS))
        for logger in trainer.loggers:  # what they buffer (TensorBoard's events) belongs to the copy
            logger.save()
        copy_logs(self.out_dir, following / "logs")
        os.replace(self.pending, following / RESUME_CHECKPOINT)  # a whole pair from here on
        if current.exists():  # while checkpoints/ is whole, a PREVIOUS a kill left is stale
            shutil.rmtree(previous, ignore_errors=True)
            current.rename(previous)
        following.rename(current)
        shutil.rmtree(previous, ignore_errors=True)
        self.pending = None
        self.spent += time.perf_counter() - t


class CommitCheckpoint(Callback):
    """Makes ResumeCheckpoint's pair as an epoch starts. Lightning runs Checkpoint callbacks last, after
    LearningRateMonitor has logged the new epoch's rate; a plain callback listed first runs before it, so
    the logs in the pair end where its training state does."""

    def __init__(self, saver: ResumeCheckpoint):
        self.saver = saver

    def on_train_epoch_start(self, trainer, module) -> None:
        self.saver.commit(trainer)


class DirectCheckpointIO(TorchCheckpointIO):
    """Writes the state to the path given, ResumeCheckpoint's temporary file: Lightning's own save writes a copy to the
    system's temporary folder first, which a kill mid-save leaves there and a full one fails the stage with. Its
    bytes reach the disk before commit renames them into place: after a power cut, a rerun resumes from them."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # a fit's own folder too: no logger made it
        with open(path, "wb") as f:  # through a file: a full disk's OSError is in the chain io.disk_full reads
            torch.save(checkpoint, f)
        to_disk(Path(path))


def make_trainer(trainer_cfg: dict, out_dir: Path, max_epochs: int, *, resume: bool = False,
                 callbacks: tuple = ()) -> pl.Trainer:
    cfg = dict(trainer_cfg)
    loggers = make_loggers(cfg.get("loggers", ["dvclive"]), out_dir, resume)
    saver = ResumeCheckpoint(out_dir, float(cfg.get("checkpoint_budget", 0.02)))
    callbacks = [saver, saver.committer, DieOnSigterm(), *callbacks]
    if loggers:  # the learning rate goes to the logs (there are none with trainer.loggers=[])
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    # as tqdm draws the other bars (progress.py): on a terminal only, never into a log file (nor with stdout closed)
    show_bar = (bool(cfg.get("progress_bar", True)) and sys.stdout is not None and sys.stdout.isatty()
                and not bars_disabled())
    if show_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=int(cfg.get("progress_refresh", 10))))
    try:
        trainer = pl.Trainer(
            max_epochs=max_epochs, logger=loggers or False, callbacks=callbacks, enable_progress_bar=show_bar,
            enable_model_summary=False, profiler=NoProfiler(), plugins=[DirectCheckpointIO()],
            enable_checkpointing=True, num_sanity_val_steps=0, default_root_dir=str(out_dir),
            log_every_n_steps=int(cfg.get("log_every_n_steps", 10)),
            precision=resolve_precision(cfg.get("precision", "auto"), str(cfg.get("accelerator", "cpu"))),
            **{k: cfg[k] for k in TRAINER_KEYS if k in cfg and cfg[k] is not None},
        )
    except (MisconfigurationException, ValueError, TypeError) as e:  # more GPUs than there are, -1 on a CPU: before
        raise TransferkitError(f"Lightning cannot set up trainer.{{accelerator, devices, strategy}} = "  # training
                               f"{cfg.get('accelerator')}, {cfg.get('devices')}, {cfg.get('strategy')} here: "
                               f"{' '.join(str(e).split()).rstrip('.')}. Fix: set them to what this machine "
                               f"has.") from e
    # no cluster launcher (Slurm, torchrun) and no NODE_RANK: every node would take rank 0 and wait for ever
    if trainer.num_nodes > 1 and isinstance(getattr(trainer.strategy, "cluster_environment", None),
                                            LightningEnvironment) and not {"NODE_RANK", "GROUP_RANK"} & {*os.environ}:
        raise TransferkitError(f"trainer.num_nodes={trainer.num_nodes} needs one copy of the command per node, "
                               f"started by srun or torchrun or with NODE_RANK set: here every copy would be node 0 "
                               f"and wait for the others for ever. Fix: on each node run it with MASTER_ADDR=NODE0 "
                               f"MASTER_PORT=29500 NODE_RANK=R, or under srun or torchrun "
                               f"(conf/trainer/ddp_multinode.yaml); on one machine, trainer.num_nodes=1.")
    return trainer


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """`values` set in os.environ, and those keys alone put back after: the variables Lightning's DDP launcher sets
    during a fit (LOCAL_RANK, MASTER_PORT, ...) stay, and tell a stage's next fit that its other ranks are running."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def checkpoint_fault(state, module: pl.LightningModule) -> str | None:
    """What keeps Lightning from resuming `module`'s fit from `state`, a loaded resume checkpoint: None if nothing."""
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        return "it holds no model weights"
    if missing := [key for key in ("epoch", "global_step", "loops", "optimizer_states") if key not in state]:
        return f"it lacks {', '.join(missing)}"
    saved = {name: tuple(getattr(t, "shape", ())) for name, t in state["state_dict"].items()}
    if saved != (wanted := {name: tuple(t.shape) for name, t in module.state_dict().items()}):
        differ = sorted(set(saved) ^ set(wanted) or {n for n in saved if saved[n] != wanted[n]})
        return f"its weights differ from the model's, first at {differ[0]}"
    return None


@dataclass
class Fit:
    model: BlockNet       # trained, on the CPU
    precision: str        # what the trainer ran in (trainer.precision resolved)
    device: str
    resumed_at_epoch: int | None
    seconds: float
    images: int           # trained on in those seconds, by every process together
    processes: int = 1    # DDP's: each trains on a batch of its own, a recipe of their own together


def fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, trainer_cfg: dict,
        out_dir: Path, max_epochs: int, callbacks: tuple = ()) -> Fit:
    """Train, resuming from out_dir's checkpoint if a killed run left one."""
    from transferkit.io import load_plain

    saved = resume_folder(out_dir)
    resume, ckpt = saved is not None, saved and saved / RESUME_CHECKPOINT
    resumed_at = None
    if resume:  # checked like any file: plain data only, nothing in it may run (one that would is refused)
        try:
            state = load_plain(ckpt, f"delete {out_dir} (the work folder of an interrupted run) and run again.")
            fault = checkpoint_fault(state, module)  # Lightning's restore would fail on it at every rerun
        except NotPlainData:
            raise
        except TransferkitError:  # a disk that failed mid-write: the next checkpoint replaces it
            fault = "it is unreadable: damaged or cut off"
        if fault:
            print(f"{ckpt} is not a checkpoint of this fit ({fault}): training from the start.", file=sys.stderr)
            saved, resume = None, False  # the fit's own first checkpoint replaces it
    if resume:
        resumed_at = int(state["epoch"]) + 1
        if first_process():  # the logs as at the checkpoint
            copy_logs(saved / "logs", out_dir)
    # Lightning's DDP launcher gives every rank cores / processes threads unless OMP_NUM_THREADS says otherwise
    threads = {"OMP_NUM_THREADS": str(int(trainer_cfg["num_threads"]))} if trainer_cfg.get("num_threads") else {}
    # the CSV logger warns, as resume_csv opens it, that it deletes its file: resume_csv restores it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*Previous log files in this directory will be deleted.*")
        trainer = make_trainer(trainer_cfg, out_dir, max_epochs, resume=resume, callbacks=callbacks)
        if resume and first_process():  # the other ranks' loggers write nothing
            resume_csv(trainer, saved / "logs" / "csv" / "metrics.csv")
    start, parent = time.perf_counter(), os.getppid()
    try:
        with _environ(threads), no_empty_hooks(module, trainer.callbacks):  # set for the fit alone
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt if resume else None, weights_only=True)
    except SIGTERMException as e:  # a SystemExit without a code: the process would exit 0 and DVC record the stage
        raise SystemExit(128 + signal.SIGTERM) from e  # as done; 143 is what a shell reports for a SIGTERM
    except SystemExit as e:  # Lightning ends a fit that Ctrl+C stopped with exit(1), as a failure would
        if e.code == 1 and trainer.interrupted:  # the command dies of SIGINT (cli.main): a shell's loop stops too
            raise KeyboardInterrupt from e
        raise
    except RuntimeError as e:  # a collective that lost a rank: which one died, and how, says more than its backend
        if trainer.world_size > 1 and (dead := ended_rank(parent)):
            raise TransferkitError(f"{dead}, and the collective waiting for it failed "
                                   f"({type(e).__name__}). Fix: run the stage again: it resumes from its last "
                                   f"checkpoint (if memory ran out, lower its batch_size or trainer.devices).") from e
        raise
    finally:  # between a stage's fits too (Lightning puts its handlers back after each): the started ranks go with it
        if DieOnSigterm.started:
            signal.signal(signal.SIGTERM, DieOnSigterm.die)
    # from the start of the training loop: not the other DDP ranks' start-up, nor moving data and model
    seconds = time.perf_counter() - max(getattr(c, "start", start) for c in trainer.callbacks
                                        if isinstance(c, ResumeCheckpoint))
    for folder in (CHECKPOINTS, NEXT, PREVIOUS):  # finished: nothing to resume
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    # a loss gone to NaN trains on without a word, and every later stage would read the NaN weights
    if not all(bool(t.isfinite().all()) for t in module.model.state_dict().values() if t.is_floating_point()):
        raise TransferkitError(f"training diverged: after {max_epochs} epochs the model's weights are not finite (NaN "
                               f"or inf). Fix: lower this stage's learning rate (its lr), or warm up longer.")
    return Fit(module.model.to("cpu"), str(trainer.precision), str(trainer.strategy.root_device), resumed_at, seconds,
               getattr(module, "trained_images", 0) * trainer.world_size, trainer.world_size)
