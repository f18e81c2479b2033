"""The part of pretrain / transfer / probe / scratch that is the same: build the module,
fit it under the configured Trainer, save a self-describing checkpoint and a metrics file."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from transferkit.data.datamodule import TaskDataModule
from transferkit.evaluation.metrics import predict
from transferkit.io import load_torch, save_json
from transferkit.models import save_checkpoint
from transferkit.models.blocknet import BlockNet
from transferkit.stages.common import Timer, global_rank, stage_dir, train_settings
from transferkit.training.classifier import ClassifierModule
from transferkit.training.trainer import fit


def load_task(cfg: DictConfig, role: str) -> dict:
    return load_torch(stage_dir(cfg, "prepare") / f"{role}.pt", f"prepared {role} task", "prepare")


def train_stage(cfg: DictConfig, stage: str, model: BlockNet, task: dict, out: Path, *,
                module_cls=ClassifierModule, stage_name: str | None = None, finalize=None,
                extra_metrics: dict | None = None, **module_kwargs) -> dict:
    """Train `model` with the optimisation block cfg[stage]; `stage_name` (default: stage) is
    what the checkpoint records, e.g. 'student' trains with the distill block's budget.
    `finalize(model)` runs after training, before evaluation and saving; it may return
    metrics to record (as may `extra_metrics`)."""
    settings = cfg[stage]
    stage_name = stage_name or stage
    module = module_cls(model, **train_settings(settings), **module_kwargs,
                        channels_last=cfg.trainer.accelerator != "mps")
    has_val = len(task["val_y"]) > 0
    datamodule = TaskDataModule(task, settings.batch_size, cfg.evaluate.batch_size,
                                val_split="val" if has_val else "none")
    with Timer() as timer:
        if settings.epochs > 0:  # pretrain.epochs=0: export published weights as they are
            model = fit(module, datamodule, dict(cfg.trainer), out, settings.epochs)
        model = model.float().to(memory_format=torch.contiguous_format).eval()
        metrics = dict(extra_metrics or {})
        if finalize is not None:
            metrics.update(finalize(model) or {})
    if global_rank() != 0:
        return {}
    for split in ("val", "test") if stage_name == "pretrain" else ("val",):
        if len(task[f"{split}_y"]):
            pred = predict(model, task[f"{split}_x"], cfg.evaluate.batch_size, tta_flip=False).argmax(1)
            metrics[f"{split}_acc"] = float((pred == task[f"{split}_y"]).float().mean())
    save_checkpoint(model, out / "model.pt", task["classes"], stage=stage_name, experiment=cfg.name)
    save_json(metrics, out / "metrics.json")
    save_json({"train_seconds": round(timer.seconds, 1),
               "train_images_per_second": round(settings.epochs * len(task["train_y"]) / max(timer.seconds, 1e-9), 1)},
              out / "timing.json")
    return metrics


