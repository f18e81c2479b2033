"""The Hydra callback conf/config.yaml registers for the stages' Hydra runs (`transferkit STAGE [-m] ...`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from hydra.experimental.callback import Callback


class Refused(BaseException):
    """A refusal that passes through Hydra, whose callbacks turn an Exception into a warning and go on."""


class OutputFolder(Callback):
    """Makes the run's (or the sweep's) folder before Hydra does, so one that cannot be made or written (a file in
    its path, no write access) is one line naming the setting, not Hydra's traceback. Hydra calls it only for a run
    or a multirun: --cfg, --info and --help write no folder."""

    def on_run_start(self, config, **kwargs) -> None:
        _make(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _make(config, "hydra.sweep.dir")


def _make(config, key: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    try:  # ${hydra:job.name} resolves once HydraConfig holds the config, as Hydra's own run_job sets it
        HydraConfig.instance().set_config(copy.deepcopy(config))
        folder = Path(str(OmegaConf.select(config, key)))
    except Exception:  # a folder this cannot resolve is Hydra's to report
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "no write access")
    except OSError as e:
        raise Refused(f"{key}={folder} cannot be made or written ({e.strerror}). Fix: set {key} to a folder you can "
                      f"write to.") from e
