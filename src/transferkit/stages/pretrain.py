"""pretrain: train the backbone on the source task (or start from published weights)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from transferkit.models import init_from_data, model_from_config
from transferkit.stages.common import container, load_task
from transferkit.stages.training import train_stage


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    task = load_task(inputs["prepare"], "source")
    model = model_from_config(container(cfg.model), len(task["classes"]))
    if not cfg.model.get("weights"):  # published weights are the init; else a data-dependent one
        init_from_data(model, task["train_x"])
    return train_stage(cfg, "pretrain", model, task, out, freeze_depth=cfg.pretrain.freeze_depth)
