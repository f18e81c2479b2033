"""What differs between a params file and what it is made from (conf/, the overrides it records, the
stage table): `transferkit check-params` itself, and check-repro and the stages run with --params."""

from __future__ import annotations

import difflib
import shlex
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from transferkit.config.compose import (compose, find_conf_dir, project_overrides, read_params, read_yaml,
                                        recorded_overrides, to_params)
from transferkit.config.dvcyaml import dvc_yaml_text
from transferkit.config.overrides import as_override, override_key
from transferkit.errors import TransferkitError
from transferkit.plain import differing, dvc_file_data, flatten


def stale_keys(params_path: Path, cfg: DictConfig, conf_dir: Path | None) -> str | None:
    """What is wrong with the keys of `cfg` (read from the params file) against conf/ composed with the overrides
    the file records: a key it lacks or one conf/ lacks (a typo), in one line; None where they agree, or where
    the file records no overrides (written by hand, or by DVC) or they no longer compose."""
    if conf_dir is None or (overrides := recorded_overrides(params_path)) is None:
        return None
    try:
        want = flatten(to_params(compose(overrides, conf_dir)))
    except TransferkitError:
        return None
    have = flatten(to_params(cfg))
    fix = "Fix: write it again with `transferkit params` (`transferkit check-params` lists what differs)."
    missing = [k for k in want if k not in have]
    if extra := [k for k in have if k not in want]:  # a renamed key: the one it lacks is the likely meaning
        close = difflib.get_close_matches(extra[0], missing, n=1) or difflib.get_close_matches(extra[0], want, n=1)
        return (f"{params_path} has {extra[0]}, which conf/ has not{f' (a typo for {close[0]}?)' if close else ''}. "
                f"Fix: correct it in {params_path}, or write the file again with `transferkit params`.")
    if missing:
        return f"{params_path} has no {missing[0]}: it was written from another conf/ or edited by hand. {fix}"
    return None


def params_drift(params_path: Path, conf_dir: Path | None = None) -> list[str]:
    """Keys whose values differ between params.yaml and conf/ composed with project_overrides."""
    saved = read_yaml(params_path) or {}
    a, b = flatten(saved), flatten(to_params(compose(project_overrides(params_path), conf_dir)))
    return [f"{k}: params.yaml has {a.get(k, '<missing>')!r}, conf/ composes {b.get(k, '<missing>')!r}"
            for k in differing(a, b)]


def regenerate_fix(params_path: Path, conf_dir: Path | None = None) -> str:
    """What ends every report of drift: the command that composes conf/ as it is now and, where params.yaml's values
    were set some other way (by hand, or by `dvc exp run -S`, which records no overrides), the one that writes them
    where one does."""
    def command(overrides: list[str]) -> str:
        return "`transferkit params" + "".join(f" {shlex.quote(o)}" for o in overrides) + "`"

    base, fix = recorded_overrides(params_path) or [], ""
    try:
        base = project_overrides(params_path)
        try:
            cfg = compose(base, conf_dir)
        except TransferkitError as e:  # its own overrides compose no longer: the options conf/ has
            options = str(e).partition(" Fix: ")[2].rstrip(".")
            return f"Fix: run `transferkit params` with overrides conf/ has ({options}); commit the files it writes."
        saved = flatten(read_params(params_path))
        composed, raw = flatten(to_params(cfg)), flatten(OmegaConf.to_container(cfg, resolve=False))
        keep = {k: saved[k] for k in differing(saved, composed) if k in saved and k in composed}
        others = [o for o in base if override_key(o) not in keep]
        leaders = {k: v for k, v in keep.items() if not str(raw[k]).startswith("${")}  # a ${key} follows its key
        for values in (leaders, keep):  # the shorter command where it writes the same
            kept = [*others, *(f"{k}={as_override(v)}" for k, v in values.items())]
            if values and flatten(to_params(compose(kept, conf_dir))) == saved:
                fix = f", or {command(kept)} to keep the values params.yaml has"
                break
    except TransferkitError:  # no params file, or one that composes no longer: the first command alone
        pass
    return (f"Fix: run {command(base)} to compose conf/ as it is now{fix} (each run of it replaces the overrides of "
            f"the last), and commit the files it writes.")


def generated_drift(params_path: Path, conf_dir: Path | None = None) -> list[str]:
    """What differs between the committed params.yaml / dvc.yaml and what they are made from."""
    try:
        saved = read_params(params_path)
    except TransferkitError as e:  # the message without its fix, which regenerate_fix gives
        return [str(e).split(" Fix: ")[0]]
    try:
        drift = [f"params.yaml differs from conf/: {d}" for d in params_drift(params_path, conf_dir)]
    except TransferkitError as e:  # an option conf/ has no longer (a renamed experiment), recorded in its header
        return [f"{params_path} is composed with {' '.join(project_overrides(params_path))} (its header says so), "
                f"which conf/ composes no longer: {str(e).split(' Fix: ')[0]}"]
    dvc_file = params_path.parent / "dvc.yaml"
    want = dvc_yaml_text(saved, params_path.parent)
    if not dvc_file.exists():
        drift.append(f"{dvc_file} is missing: the stage table writes it")
    elif (have := dvc_file.read_text()) != want:  # made for other settings (`dvc exp run -S`), or by other code
        parts = differing_parts(have, want)
        where = f" ({', '.join(parts)})" if parts else ""
        drift.append(f"{dvc_file} differs{where} from what the stage table (src/transferkit/stages/__init__.py) and "
                     f"the code its stages import write for {params_path.name}'s settings")
    return drift


def differing_parts(have: str, want: str) -> list[str]:
    """Where a dvc.yaml differs from the one wanted: each stage's field (`prepare's deps`), each other section."""
    try:
        a, b = (dvc_file_data(text) for text in (have, want))
    except yaml.YAMLError:  # edited by hand into no YAML: the whole file differs
        return []
    if not isinstance(a, dict):
        return []
    stages_a, stages_b = (d.get("stages") if isinstance(d.get("stages"), dict) else {} for d in (a, b))
    parts = []
    for name in dict.fromkeys([*stages_a, *stages_b]):
        stage_a, stage_b = stages_a.get(name), stages_b.get(name)
        if not (isinstance(stage_a, dict) and isinstance(stage_b, dict)):  # one file lacks it
            parts.append(f"stage {name}")
        else:
            parts += [f"{name}'s {field}" for field in dict.fromkeys([*stage_a, *stage_b])
                      if stage_a.get(field) != stage_b.get(field)]
    return parts + [key for key in dict.fromkeys([*a, *b]) if key != "stages" and a.get(key) != b.get(key)]


def main(argv: list[str]) -> int:
    """`transferkit check-params [FILE]`: exit 1 where params.yaml or dvc.yaml differs from what it is made from."""
    usage = "Fix: `transferkit check-params [PARAMS_FILE]`."
    if {"-h", "--help"} & set(argv):
        print("usage: transferkit check-params [PARAMS_FILE]\n\nExits 1, listing what differs, where params.yaml "
              "(default: the project's) or dvc.yaml differs from what it is made from: conf/ composed with the "
              "overrides params.yaml records, and the stage table.")
        return 0
    if options := [a for a in argv if a.startswith("-")]:
        raise TransferkitError(f"check-params has no option {options[0]}. {usage}")
    if overrides := [a for a in argv if "=" in a and not Path(a).exists()]:  # a Hydra job folder has "="
        raise TransferkitError(f"check-params takes a params file, not overrides ({overrides[0]}): it composes "
                               f"conf/ with the overrides params.yaml records. {usage}")
    if len(argv) > 1:
        raise TransferkitError(f"check-params checks one params file, not {len(argv)} ({' '.join(argv)}). {usage}")
    path = Path(argv[0]) if argv else find_conf_dir().parent / "params.yaml"
    if argv and not path.is_file():  # a mistyped path: `transferkit params` would write the project's, not this one
        raise TransferkitError(f"{argv[0] or repr('')} is {'a folder' if path.is_dir() else 'no file'}, not a params "
                               f"file. {usage}")
    if drift := generated_drift(path):
        print("\n".join([*drift, regenerate_fix(path)]), file=sys.stderr)
        return 1
    print("params.yaml and dvc.yaml match conf/ and the stage table")
    return 0
