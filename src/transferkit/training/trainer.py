"""Build a Lightning Trainer from the `trainer` config group and fit a module.

Accelerator, devices, strategy, nodes and precision come only from config: the same stage
code runs on a CPU, a GPU, or DDP over many processes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from transferkit.models.blocknet import BlockNet

# Lightning warnings that are about choices made on purpose here:
warnings.filterwarnings("ignore", r".*module\(s\) in eval mode.*")  # frozen blocks stay in eval mode
warnings.filterwarnings("ignore", r".*overridden `on_after_batch_transfer`.*")  # augmentation lives there
warnings.filterwarnings("ignore", r".*does not have many workers.*")  # batches are slices of in-memory tensors
warnings.filterwarnings("ignore", r".*smaller than the logging interval.*")  # tiny smoke datasets
warnings.filterwarnings("ignore", r".*Total length of .* across ranks is zero.*")  # no val split (pretrain)

TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "precision", "deterministic",
                "sync_batchnorm", "benchmark")


LOGGERS = ("dvclive", "tensorboard", "csv")


def make_loggers(names, out_dir: Path) -> list:
    """dvclive feeds `dvc metrics/plots` and the report's curves; TensorBoard and CSV are
    there for users who already read their runs that way (trainer.loggers=[dvclive,tensorboard])."""
    from transferkit.errors import TransferkitError

    loggers = []
    for name in names or []:
        if name == "dvclive":
            from dvclive.lightning import DVCLiveLogger

            # dvcyaml=None: dvclive must not rewrite the project's dvc.yaml; the stage declares
            # its metrics and plots there itself.
            loggers.append(DVCLiveLogger(dir=str(out_dir / "dvclive"), dvcyaml=None, save_dvc_exp=False,
                                         report=None))
        elif name == "tensorboard":
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version=""))
        elif name == "csv":
            from pytorch_lightning.loggers import CSVLogger

            loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
        else:
            raise TransferkitError(f"unknown logger '{name}' in trainer.loggers. Fix: use any of {list(LOGGERS)}.")
    return loggers


def make_trainer(trainer_cfg: dict, out_dir: Path, max_epochs: int) -> pl.Trainer:
    cfg = dict(trainer_cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    loggers = make_loggers(cfg.get("loggers", ["dvclive"]), out_dir)
    callbacks = [
        ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last", save_last=False,
                        save_top_k=1, monitor=None, every_n_epochs=1),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    show_bar = bool(cfg.get("progress_bar", True))
    if show_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=int(cfg.get("progress_refresh", 10))))
    return pl.Trainer(
        max_epochs=max_epochs,
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=int(cfg.get("log_every_n_steps", 10)),
        default_root_dir=str(out_dir),
        **{k: cfg[k] for k in TRAINER_KEYS if k in cfg and cfg[k] is not None},
    )


def fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, trainer_cfg: dict,
        out_dir: Path, max_epochs: int) -> BlockNet:
    """Train; return the trained model on the CPU."""
    trainer = make_trainer(trainer_cfg, out_dir, max_epochs)
    trainer.fit(module, datamodule=datamodule)
    return module.model.to("cpu")
