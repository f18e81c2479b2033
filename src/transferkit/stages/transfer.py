"""transfer: the pretrained backbone, a new head, blocks[:freeze_depth] frozen, the rest
fine-tuned with a smaller learning rate than the head (and optionally unfrozen gradually)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from transferkit.config.checks import validate_depths
from transferkit.models import load_backbone
from transferkit.stages.common import container, load_task
from transferkit.stages.training import train_stage


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    task = load_task(inputs["prepare"], "target")
    model = load_backbone(inputs["pretrain"] / "model.pt", container(cfg.model), len(task["classes"]), "pretrain")
    validate_depths(cfg, "transfer", model.num_blocks)
    t = cfg.transfer
    return train_stage(cfg, "transfer", model, task, out, freeze_depth=t.freeze_depth,
                       backbone_lr_mult=t.backbone_lr_mult, unfreeze_every_epochs=t.unfreeze_every_epochs)
