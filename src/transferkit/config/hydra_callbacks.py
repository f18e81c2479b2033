"""The Hydra callback conf/config.yaml registers for the stages' Hydra runs (`transferkit STAGE [-m] ...`), and what
cli reads of Hydra's own settings before such a run starts."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback


class Refused(BaseException):
    """A refusal that passes through Hydra, whose callbacks turn an Exception into a warning and go on."""


def without_rerun(args):
    """Hydra's parsed flags (`args`), refused with --experimental-rerun FILE: Hydra reads FILE with pickle.load, and a
    pickle calls any function it names (every file transferkit reads is plain data, docs/faults.md)."""
    if getattr(args, "experimental_rerun", None) is not None:
        from transferkit.errors import TransferkitError

        raise TransferkitError(f"--experimental-rerun {args.experimental_rerun}: Hydra unpickles that file, which runs "
                               f"any code it holds, so transferkit does not read it. Fix: run the job again with its "
                               f"overrides (its .hydra/overrides.yaml lists them).")
    return args


def declared_sweep(overrides: list[str]) -> list[str]:
    """The sweep conf/ declares under hydra.sweeper.params, composed with `overrides`, as overrides (key=a,b) less the
    keys `overrides` set: Hydra's basic sweeper adds them to the command line's, which decide a key set in both. By
    hand: Hydra gives no way to list a multirun's points before it runs them."""
    from hydra import compose, initialize_config_dir

    from transferkit.config.compose import find_conf_dir
    from transferkit.config.overrides import override_key

    try:
        with initialize_config_dir(str(find_conf_dir().resolve()), version_base="1.3"):
            params = compose("config", overrides=overrides, return_hydra_config=True).hydra.sweeper.params or {}
    except Exception:  # conf/ or an override that does not compose: check_points composes them, and words the error
        return []
    given = {override_key(o) for o in overrides}
    return [f"{key}={value}" for key, value in params.items() if key not in given]  # as Hydra's sweeper writes them


class OutputFolder(Callback):
    """Checks the run's (or the sweep's) folder before Hydra makes it, so one that cannot be made or written (a
    file in its path, no write access) is one line naming the setting, not Hydra's traceback. Hydra calls it only
    for a run or a multirun: --cfg, --info and --help write no folder."""

    def on_run_start(self, config, **kwargs) -> None:
        _check(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _check(config, "hydra.sweep.dir")
        _check_launcher(config.hydra.launcher)


def _check_launcher(launcher) -> None:
    """What the launchers of conf/hydra/launcher/ end in a traceback for once the sweep starts."""
    import shutil

    if str(launcher.get("_target_")).endswith(".SlurmLauncher") and (missing := [
            tool for tool in ("sbatch", "srun") if not shutil.which(tool)]):
        raise Refused(f"hydra/launcher=slurm submits each point with Slurm's sbatch and srun, and this machine has no "
                      f"{missing[0]}. Fix: run it on a Slurm cluster's login node, or here without it (the points one "
                      f"after another) or with hydra/launcher=local_parallel.")
    if str(launcher.get("_target_")).endswith(".JoblibLauncher") and launcher.get("n_jobs") == 0:
        raise Refused("hydra.launcher.n_jobs=0 runs no point at a time. Fix: set it to a count >= 1, or -1 (one "
                      "point per CPU core).")


def _unwritable(folder: Path) -> str | None:
    """Why no folder can be made in `folder`, found by making one (os.access answers yes to root, for /proc too)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".transferkit-check-", dir=folder))
    except OSError as e:
        return f"no folder can be made in {folder}: {e.strerror}"
    return None


def _check(config, key: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg  # put back after: what Hydra resolves next is what it would without this check
    # ${hydra:job.name} resolves once HydraConfig holds the config, as Hydra's run_job sets it; on a copy, as
    # set_config makes the hydra node of what it is given read-only
    try:
        hydra_config.set_config(copy.deepcopy(config))
        folder = Path(str(OmegaConf.select(config, key))).absolute()
    except Exception:  # a folder this cannot resolve is Hydra's to report
        return
    finally:
        hydra_config.cfg = before
    # where Hydra would make it (lexists: a path this user cannot look into counts as missing, not as an error)
    there = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    problem = (f"{there} is a link to nothing (broken, or a loop)" if not os.path.exists(there) else
               f"{there} is a file" if not os.path.isdir(there) else _unwritable(there))
    if problem:
        raise Refused(f"{key}={folder} cannot be made ({problem}). Fix: set {key} to a folder you can write to.")
    from transferkit.config.compose import find_conf_dir
    from transferkit.stages import BY_NAME

    paths, root, chdir = config.get("paths") or {}, find_conf_dir().parent, OmegaConf.select(config, "hydra.job.chdir")
    starts = folder if chdir else Path.cwd()  # hydra.job.chdir=true: each job starts in its run's folder
    if starts.resolve() != root and (loose := [k for k, v in paths.items() if not Path(str(v)).is_absolute()]):
        how = " (hydra.job.chdir=true)" if chdir else ""
        raise Refused(f"paths.{loose[0]}={paths[loose[0]]} is relative to the folder a run starts in, and this one "
                      f"starts in {starts}{how}, not in the project {root}: it would read and make other folders. "
                      f"Fix: run it from {root}{' without hydra.job.chdir=true' if chdir else ''}, or "
                      f"set paths.{loose[0]} to an absolute path.")
    # what DVC tracks: a run's files there would change them
    tracked = {"paths.data_dir, prepare's input": paths.get("data_dir"),
               **{f"{s}'s outputs": f"{paths.get('artifacts_dir')}/{s}" for s in BY_NAME if paths.get("artifacts_dir")}}
    if inside := next((what for what, p in tracked.items() if p and _within(folder, Path(p))), None):
        raise Refused(f"{key}={folder} is inside {inside}, which DVC tracks: the run's .hydra/ and log would change "
                      f"it. Fix: set {key} to a folder outside paths.data_dir and paths.artifacts_dir's stage folders.")


def _within(folder: Path, other: Path) -> bool:
    """Whether `folder` lies in `other`, as written (data/../outputs does not) or through links (a link to it does)."""
    as_written = Path(os.path.normpath(folder)).is_relative_to(os.path.normpath(other.absolute()))
    return as_written or folder.resolve().is_relative_to(other.resolve())
