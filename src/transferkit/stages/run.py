"""Running one stage: validate the config, seed, hand the stage its inputs' folders and a work
folder that replaces its output folder only when the stage succeeds."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from omegaconf import DictConfig

from transferkit.stages import BY_NAME, inputs_of, module_of


def run_stage(stage: str, cfg: DictConfig, out: Path, inputs: dict[str, Path] | None = None) -> dict:
    """`inputs` defaults to the stages' folders under paths.artifacts_dir (the stage table's reads)."""
    from transferkit.config.compose import to_params
    from transferkit.config.schema import validate
    from transferkit.stages.common import seed_everything, staged_output, storage_errors
    from transferkit.training.precision import check_accelerator

    validate(cfg)
    check_accelerator(str(cfg.trainer.accelerator))
    seed_everything(cfg.seed)
    inputs = {**inputs_of(stage, cfg.paths.artifacts_dir), **(inputs or {})}
    module = importlib.import_module(module_of(stage))
    # the params saved with the outputs say what produced them: collect reads them, and a killed
    # run's folder is resumed only by a run with the same params
    params = yaml.safe_dump(to_params(cfg), sort_keys=False)
    others = [Path(cfg.paths.artifacts_dir) / name for name in BY_NAME if name != stage]  # dvc.yaml's outputs
    with storage_errors(out), staged_output(out, params, inputs.values(), others) as work:
        return module.run(cfg, inputs, work)
