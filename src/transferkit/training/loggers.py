"""The run's logs (trainer.loggers): dvclive feeds `dvc metrics/plots` and the report's curves;
TensorBoard and CSV are there for users who already read their runs that way. A resumed run
continues the logs a checkpoint's copy restored."""

from __future__ import annotations

import functools
import shutil
import sys
import time
from pathlib import Path

import pytorch_lightning as pl

from transferkit.errors import TransferkitError
from transferkit.training import LOGGERS


# The Lightning calls after which dvclive writes its files out (dvclive.lightning._should_sync's list).
DVCLIVE_SYNC_CALLERS = frozenset({"update_train_step_metrics", "update_train_epoch_metrics", "log_eval_end_metrics"})


def _called_from(names: frozenset) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in names:
            return True
        frame = frame.f_back
    return False


@functools.cache  # one class, made on first use: dvclive is imported only where it logs
def _dvclive_class() -> type:
    from dvclive.lightning import DVCLiveLogger
    from pytorch_lightning.utilities import rank_zero_only

    class FrameNameDVCLiveLogger(DVCLiveLogger):
        """dvclive's own log_metrics picks `sync` by inspect.stack(), which reads the source lines of
        every frame on the stack at every call (and, in a TRANSFERKIT_WARM worker, searches all
        loaded modules for runpy's frames); the frames' function names alone decide the same."""

        @rank_zero_only
        def log_metrics(self, metrics, step=None, sync=False) -> None:
            super(DVCLiveLogger, self).log_metrics(metrics, step, sync or _called_from(DVCLIVE_SYNC_CALLERS))

    return FrameNameDVCLiveLogger


def make_loggers(names, out_dir: Path, resume: bool = False) -> list:
    """The loggers `names` (trainer.loggers, e.g. [dvclive,tensorboard]) writing under out_dir/<name>/."""
    loggers = []
    for name in names or []:
        if name == "dvclive":
            # dvcyaml=None: dvclive must not rewrite the project's dvc.yaml; the stage declares
            # its metrics and plots there itself.
            loggers.append(_dvclive_class()(dir=str(out_dir / "dvclive"), dvcyaml=None, save_dvc_exp=False,
                                            report=None, resume=resume))
        elif name == "tensorboard":
            from pytorch_lightning.loggers import TensorBoardLogger

            # its event files are named by the second they start in: a resumed run's must not replace the copy's
            loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="",
                                             **({"filename_suffix": f".resumed-{time.time_ns()}"} if resume else {})))
        elif name == "csv":
            from pytorch_lightning.loggers import CSVLogger

            loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
        else:
            raise TransferkitError(f"unknown logger '{name}' in trainer.loggers. Fix: use any of {list(LOGGERS)}.")
    return loggers



def resume_csv(trainer: pl.Trainer, saved: Path) -> None:
    """Lightning's CSV logger cannot resume: it deletes metrics.csv when it starts. Put the rows
    logged up to the checkpoint back and tell it their columns, so it appends after them."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and saved.is_file():
            writer = logger.experiment
            shutil.copy(saved, writer.metrics_file_path)
            with open(saved, newline="") as f:
                writer.metrics_keys = list(csv.DictReader(f).fieldnames or [])


def copy_logs(source: Path, dest: Path) -> None:
    """Every logger's folder in `source` copied into `dest`, in place of what `dest` had (made, if need be, even
    with no loggers: a checkpoint's pair is whole when its logs folder exists)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in LOGGERS:
        if (dest / name).exists():
            shutil.rmtree(dest / name)
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name)
