"""probe: a linear classifier on frozen features of the pretrained backbone, taken after
blocks[:depth] (an earlier block = the "small and different data" scenario)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from transferkit.config.checks import validate_depths
from transferkit.models import load_backbone
from transferkit.stages.common import container, load_task
from transferkit.stages.training import train_stage


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    task = load_task(inputs["prepare"], "target")
    n = len(task["classes"])
    model = load_backbone(inputs["pretrain"] / "model.pt", container(cfg.model), n, "pretrain")
    validate_depths(cfg, "probe", model.num_blocks)
    if cfg.probe.depth is not None and cfg.probe.depth < model.num_blocks:
        model.truncate(cfg.probe.depth, n)
    return train_stage(cfg, "probe", model, task, out, freeze_depth=model.num_blocks)
