"""What every training stage shares: build the module, fit it under the configured Trainer,
save a self-describing checkpoint and a metrics file."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from transferkit.data.loader import TaskDataModule
from transferkit.evaluation.metrics import predict
from transferkit.evaluation.tables import pct
from transferkit.io import save_json
from transferkit.models import save_checkpoint
from transferkit.models.blocknet import BlockNet
from transferkit.stages.common import announce, data_settings, train_settings
from transferkit.training import first_process
from transferkit.training.classifier import ClassifierModule
from transferkit.training.precision import eval_device, trained_in
from transferkit.training.trainer import fit


def channels_last(cfg: DictConfig) -> bool:
    return cfg.trainer.accelerator != "mps"


def fit_stage(cfg: DictConfig, settings: DictConfig, model: BlockNet, task: dict, out: Path, *,
              module_cls=ClassifierModule, epochs: int | None = None, **module_kwargs):
    """Fit `model` on the task's train split with the optimisation block `settings`."""
    from transferkit.training.lookahead import Lookahead

    module = module_cls(model, **train_settings(settings, cfg.seed), **module_kwargs, channels_last=channels_last(cfg))
    has_val = len(task["val_y"]) > 0
    datamodule = TaskDataModule(task, settings.batch_size, cfg.evaluate.batch_size,
                                val_split="val" if has_val else "none", channels_last=channels_last(cfg),
                                batch_key=f"{settings._key()}.batch_size", **data_settings(settings, cfg.seed))
    callbacks = (Lookahead(),) if settings.lookahead else ()
    return fit(module, datamodule, dict(cfg.trainer), out, settings.epochs if epochs is None else epochs, callbacks)


def train_stage(cfg: DictConfig, stage: str, model: BlockNet, task: dict, out: Path, *,
                module_cls=ClassifierModule, finalize=None, extra_metrics: dict | None = None,
                earlier_fits: list = (), **module_kwargs) -> dict:
    """Train `model` with the optimisation block cfg[stage]. `finalize(model)` runs after
    training, before evaluation and saving; it may return metrics to record (as may `extra_metrics`).
    `earlier_fits`: the stage's fits before this one (prune's sparse learning and rounds), counted in its timing."""
    settings = cfg[stage]
    run = {"train_seconds": 0.0, "train_images_per_second": None, "precision": None, "device": None,
           "processes": None, "resumed_at_epoch": None, "threads": None}
    if settings.epochs > 0:  # pretrain.epochs=0: export published weights as they are
        result = fit_stage(cfg, settings, model, task, out, module_cls=module_cls, **module_kwargs)
        model = result.model
        seconds, images = (sum(getattr(f, k) for f in (*earlier_fits, result)) for k in ("seconds", "images"))
        run = {"train_seconds": round(seconds, 2), "train_images_per_second": round(images / max(seconds, 1e-9), 1),
               "precision": result.precision, "device": result.device, "processes": result.processes,
               "resumed_at_epoch": result.resumed_at_epoch,
               "threads": torch.get_num_threads()}  # the weights' float sums depend on it: after the fit, as
        # Lightning's DDP launcher sets this process's count to cores / processes as it starts the others
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    metrics = dict(extra_metrics or {})
    if finalize is not None:
        metrics.update(finalize(model) or {})
    if not first_process():
        return {}
    ev, device = cfg.evaluate, eval_device(str(cfg.trainer.accelerator))
    for split in ("val", "test") if stage == "pretrain" else ("val",):
        if len(task[f"{split}_y"]):
            logits = predict(model, task[f"{split}_x"], ev.batch_size, "none", device)
            hits = logits.argmax(1) == task[f"{split}_y"]
            metrics[f"{split}_acc"] = float(hits.float().mean())
    if stage == "pretrain" and len(task["test_y"]) and settings.tta != "none":  # the source task's score with TTA
        hits = predict(model, task["test_x"], ev.batch_size, settings.tta, device).argmax(1) == task["test_y"]
        metrics["test_acc_tta"] = float(hits.float().mean())
    save_checkpoint(model, out / "model.pt", task["classes"], stage=stage, experiment=cfg.name)
    save_json(metrics, out / "metrics.json")
    save_json(run, out / "timing.json")  # how this machine ran it: not part of the reproducible metrics
    announce(summary_line(stage, settings, metrics, run))
    return metrics


SCORES = {"val_acc": "val", "test_acc": "test", "test_acc_tta": "test with TTA"}


def summary_line(stage: str, settings: DictConfig, metrics: dict, run: dict) -> str:
    """What a training stage ends with on the console: its scores and how it trained."""
    name = ("pretrain (source task)" if stage == "pretrain" else f"transfer ({frozen(settings)})" if stage == "transfer"
            else stage)
    scores = ", ".join(f"{label} {pct(metrics[k])}%" for k, label in SCORES.items() if k in metrics)
    seconds = run["train_seconds"]
    how = (f"{seconds:.{int(seconds < 10)}f} s of training at {run['train_images_per_second']:,.0f} img/s "
           f"({trained_in(run)})" if run["precision"] else "not trained (epochs 0)")
    if run.get("resumed_at_epoch"):  # the seconds are this run's: the killed run's epochs are not in them
        how += f", resumed after epoch {run['resumed_at_epoch']} of {settings.epochs} from a killed run's checkpoint"
    return f"{name}: top-1 {scores or 'not scored (no val split)'}; {how}"


def frozen(transfer: DictConfig) -> str:
    """What transfer kept frozen, as ClassifierModule applies the settings."""
    if transfer.backbone_lr_mult == 0:  # no rate for any block: the whole backbone stays as pretrained
        return "backbone frozen: backbone_lr_mult 0"
    every = transfer.unfreeze_every_epochs if transfer.freeze_depth else 0  # depth 0: nothing frozen to unfreeze
    return f"freeze depth {transfer.freeze_depth}" + (f", one block unfrozen every {every} epochs" if every else "")
