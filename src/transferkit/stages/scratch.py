"""scratch: the baseline. The same architecture and budget as transfer, from random init."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from transferkit.models import init_from_data, model_from_config
from transferkit.stages.common import container, load_task
from transferkit.stages.training import train_stage


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    task = load_task(inputs["prepare"], "target")
    # random init, even when pretrain starts from published weights: their architecture (resnet18's
    # 7x7 stem), never their values
    model = model_from_config(container(cfg.model), len(task["classes"]), fetch_weights=False)
    init_from_data(model, task["train_x"])  # freeze_depth=1 keeps only such a block fixed (validate checks)
    return train_stage(cfg, "scratch", model, task, out, freeze_depth=cfg.scratch.freeze_depth)
