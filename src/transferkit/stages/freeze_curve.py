"""freeze_curve: the transfer recipe once more at every depth of freeze_curve.depths, so each
`dvc repro` answers "how many blocks should I freeze?" and evaluate can plot accuracy vs
freeze depth. Each point is exactly `transferkit transfer transfer.freeze_depth=K` (same seed,
same settings; only the depth differs) and lands in depthK/ with its own model and metrics.
The transfer stage's own depth is not trained again: evaluate takes that point from it."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferkit.config.checks import validate_depths
from transferkit.models import load_backbone
from transferkit.stages import transfer
from transferkit.stages.common import container, load_task, point_dir, seed_everything


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    # every depth checked before the first one trains
    classes = load_task(inputs["prepare"], "target")["classes"]
    backbone = load_backbone(inputs["pretrain"] / "model.pt", container(cfg.model), len(classes), "pretrain")
    validate_depths(cfg, "freeze_curve", backbone.num_blocks)
    results = {}
    for depth in [d for d in cfg.freeze_curve.depths if d != cfg.transfer.freeze_depth]:
        if (point_dir(out, depth) / "timing.json").is_file():  # finished by a killed run this one resumes
            results[f"depth{depth}"] = json.loads((point_dir(out, depth) / "metrics.json").read_text())
            continue
        point = OmegaConf.merge(cfg, {"transfer": {"freeze_depth": depth}})
        seed_everything(cfg.seed)  # every point starts where a lone transfer run would
        results[f"depth{depth}"] = transfer.run(point, inputs, point_dir(out, depth))
    return results
