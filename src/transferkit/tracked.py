"""Where a command that writes into a folder the user names (`export --out`, `collect --out`) must not write:
into what a dvc.yaml around it tracks (a stage's outputs, which `dvc repro` would then see changed or replace;
an input such as data/, which would rerun the pipeline), into a project's folder itself or into its conf/."""

from __future__ import annotations

import os
from pathlib import Path

from transferkit.errors import TransferkitError


def _forms(path: Path) -> list[Path]:
    """A path as written (made absolute: a link to scratch storage is still the project's folder) and as resolved."""
    return list(dict.fromkeys([Path(os.path.abspath(path)), path.resolve()]))


def _tracked_paths(dvc_file: Path) -> list[tuple[Path, str, str]]:
    """Each dep and out (metrics and plots too) of each stage of `dvc_file`: its path, the stage, what it is."""
    import yaml

    from transferkit.plain import dvc_file_data

    try:
        data = dvc_file_data(dvc_file.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # a dvc.yaml that cannot be read: DVC reports it where it runs
        return []
    stages = data.get("stages") if isinstance(data, dict) else None
    paths = []
    for name, stage in stages.items() if isinstance(stages, dict) else ():
        if not isinstance(stage, dict) or "foreach" in stage or "matrix" in stage:  # templates: DVC expands them
            continue
        wdir = dvc_file.parent / str(stage.get("wdir") or ".")
        for kind in ("outs", "metrics", "plots", "deps"):
            what = f"an input of the {name} stage" if kind == "deps" else f"the {name} stage's outputs"
            for entry in stage.get(kind) or []:
                paths += [(wdir / str(path), name, what) for path in (entry if isinstance(entry, dict) else [entry])]
    return paths


def check_untracked(folder: Path, option: str, stage: str | None = None) -> None:
    """Refuses `folder` (given as `option`) where it is, holds or lies in what a dvc.yaml in a folder above it
    tracks, or lies in a project's conf/; `stage`'s own output folder is its to write, as DVC runs it."""
    fix = f"Fix: {option.split(' (')[0]} a new folder of its own (such as outputs/NAME)."  # "--out (by default ...)"
    if held := [name for name in ("params.yaml", "dvc.yaml", "conf") if (folder / name).exists()]:
        raise TransferkitError(f"{option} {folder} holds {held[0]}: a stage's outputs or a project, whose files these "
                               f"would mix with or overwrite. {fix}")
    targets = _forms(folder)
    for home in dict.fromkeys(p for t in targets for p in t.parents):
        if not (home / "dvc.yaml").is_file():
            continue
        if any(t.is_relative_to(home / "conf") for t in targets) and (home / "conf").is_dir():
            raise TransferkitError(f"{option} {folder} is in the project's conf/ ({home}/conf), and these files "
                                   f"would mix with its config. {fix}")
        tracked = _tracked_paths(home / "dvc.yaml")
        own = {p for path, name, what in tracked if name == stage and what.endswith("outputs") for p in _forms(path)}
        for path, name, what in tracked:
            for t, p in ((t, p) for t in targets for p in _forms(path)):
                if t in own or not (t == p or t.is_relative_to(p) or p.is_relative_to(t)):
                    continue
                relation = "is" if t == p else "lies in" if t.is_relative_to(p) else "holds"
                raise TransferkitError(f"{option} {folder} {relation} {p}, {what} in {home / 'dvc.yaml'}, and these "
                                       f"files would change or mix with what DVC tracks. {fix}")
