"""Where a command that writes into a folder the user names (`export --out`, `collect --out`) must not write:
into what a dvc.yaml around it tracks (a stage's outputs, which `dvc repro` would then see changed or replace;
an input such as data/, which would rerun the pipeline), into a project's folder itself or into its conf/."""

from __future__ import annotations

from pathlib import Path

from transferkit.errors import TransferkitError


def _tracked_paths(dvc_file: Path) -> dict[Path, tuple[str, str]]:
    """Each dep and out of each stage of `dvc_file`, as an absolute path, with its stage and what it is to it."""
    import yaml

    from transferkit.plain import dvc_file_data

    try:
        data = dvc_file_data(dvc_file.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # a dvc.yaml that cannot be read: DVC reports it where it runs
        return {}
    stages = data.get("stages") if isinstance(data, dict) else None
    paths = {}
    for name, stage in stages.items() if isinstance(stages, dict) else ():
        stage = stage if isinstance(stage, dict) else {}
        for kind, what in (("outs", f"the {name} stage's outputs"), ("deps", f"an input of the {name} stage")):
            for entry in stage.get(kind) or []:
                for path in entry if isinstance(entry, dict) else [entry]:
                    paths.setdefault((dvc_file.parent / str(path)).resolve(), (name, what))
    return paths


def check_untracked(folder: Path, option: str, stage: str | None = None) -> None:
    """Refuses `folder` (given as `option`) where it is, holds or lies in what a dvc.yaml in a folder above it
    tracks, or is a project's own folder or lies in its conf/; `stage`'s own output folder is its to write."""
    target = folder.resolve()
    fix = f"Fix: {option} a new folder of its own (such as outputs/NAME)."
    if held := [name for name in ("params.yaml", "dvc.yaml", "conf") if (folder / name).exists()]:
        raise TransferkitError(f"{option} {folder} holds {held[0]}: a stage's outputs or a project, whose files these "
                               f"would mix with or overwrite (a quantize folder's model.onnx). {fix}")
    for home in (target, *target.parents):
        if not (home / "dvc.yaml").is_file():
            continue
        if target == home or (home / "conf").is_dir() and target.is_relative_to(home / "conf"):
            where = f"the folder of {home / 'dvc.yaml'}" if target == home else f"in the project's conf/ ({home}/conf)"
            raise TransferkitError(f"{option} {folder} is {where}, and these files would mix with the project's "
                                   f"own. {fix}")
        for path, (name, what) in _tracked_paths(home / "dvc.yaml").items():
            if target == path and name == stage and what.endswith("outputs"):
                continue
            if target == path or target.is_relative_to(path) or path.is_relative_to(target):
                relation = "is" if target == path else "lies in" if target.is_relative_to(path) else "holds"
                raise TransferkitError(f"{option} {folder} {relation} {path}, {what} in {home / 'dvc.yaml'}, and "
                                       f"these files would change or mix with what DVC tracks. {fix}")
