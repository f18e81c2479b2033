"""Running one stage: validate the config, seed, hand the stage its inputs' folders and a work
folder that replaces its output folder only when the stage succeeds."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import yaml
from omegaconf import DictConfig

from transferkit.plain import dvc_file_data
from transferkit.stages import BY_NAME, inputs_of, module_of, named_files
from transferkit.training import first_process


def run_stage(stage: str, cfg: DictConfig, out: Path, inputs: dict[str, Path] | None = None) -> dict:
    """`inputs` defaults to the stages' folders under paths.artifacts_dir (the stage table's reads)."""
    import torch

    from transferkit.config.checks import validate, validate_run
    from transferkit.config.compose import to_params
    from transferkit.stages.common import announce, seed_everything, staged_output, storage_errors
    from transferkit.training.precision import check_accelerator

    # in the project's pipeline under DVC the params file is the whole pipeline's: a value a later stage cannot run
    # with (a freeze depth past the model's blocks, set by `dvc exp run -S`) fails the first stage that runs, not one
    # an hour in (a sweep's points, `pointN` to DVC, are checked for their own stage, as `transferkit sweep` does)
    if os.environ.get("DVC_STAGE", "").rpartition(":")[2] == stage:
        validate_run(cfg, stage, {}, all_stages=True)
    else:  # the stage checks its own depths as it builds its model
        validate(cfg)
    check_files_tracked(stage, cfg)
    if any(key.split(".")[0] == "trainer" for key in BY_NAME[stage].params):  # prepare touches no device
        check_accelerator(cfg.trainer, BY_NAME[stage].trains)
    seed_everything(cfg.seed)
    inputs = {**inputs_of(stage, cfg.paths.artifacts_dir), **(inputs or {})}
    module = importlib.import_module(module_of(stage))
    # the params saved with the outputs say what produced them: collect reads them
    params = yaml.safe_dump(to_params(cfg), sort_keys=False)
    others = [Path(cfg.paths.artifacts_dir) / name for name in BY_NAME if name != stage]  # dvc.yaml's outputs
    # a file a setting names is read as the input folders are: a changed one is no run to resume
    reads = [*inputs.values(), *map(Path, named_files(stage, to_params(cfg)).values())]
    threads = torch.get_num_threads()
    if cfg.trainer.get("num_threads"):  # every stage's: evaluate's and quantize's timings as well as the fits
        torch.set_num_threads(int(cfg.trainer.num_threads))
    try:
        with storage_errors(out), staged_output(out, params, reads, others, tracked(stage, cfg)) as work:
            result = module.run(cfg, inputs, work)
    finally:
        torch.set_num_threads(threads)
    if not os.environ.get("DVC_STAGE") and first_process():  # DVC says where its stages write
        announce(hand_run_note(stage, cfg, out) if kept_by_dvc(stage, out) else f"{stage}: outputs in {out}")
    return result


def hand_run_note(stage: str, cfg: DictConfig, out: Path) -> str:
    """What a run by hand into the folder `dvc repro` keeps for `stage` means for the pipeline: recorded as it is
    (`dvc commit`), only where params.yaml holds the settings DVC tracks for it, or the report would compare
    models trained otherwise than params.yaml says (an override given to the run)."""
    from transferkit.plain import differing

    try:
        held = tracked_values(stage, cfg, yaml.safe_load(Path("params.yaml").read_text()))
    except (OSError, yaml.YAMLError, AttributeError, TypeError):  # none, or not one of ours
        held = None
    made = tracked_values(stage, cfg)
    again = f"the next `dvc repro` runs {stage} and the stages after it again"
    if held is not None and (other := differing(held, made)):
        # a setting an earlier stage tracks too (seed, trainer.*, model.*) reruns that stage once params.yaml holds it
        tracks = {e: tracked_values(e, cfg) for e in earlier(stage)}
        shared = next(((k, e) for k in other for e, values in tracks.items() if k in values), None)
        keep = (f"They cannot be kept: {shared[0]} is {shared[1]}'s setting too, so with it in params.yaml `dvc repro` "
                f"runs {shared[1]} again, and {stage} after it (to have them made so, `transferkit params` with your "
                f"overrides, then `dvc repro`)" if shared else "To keep them, write params.yaml with those settings "
                f"(`transferkit params` with your overrides), then `dvc commit -f {stage}`")
        return (f"{out} is where `dvc repro` keeps {stage}'s outputs, and these were made with settings params.yaml "
                f"does not hold ({', '.join(f'{k}={made.get(k)}' for k in other[:3])}{', ...' * (len(other) > 3)}): "
                f"{again}. {keep}.")
    record = ("(params.yaml holds their settings); without it" if held is not None else
              "if params.yaml holds the settings they were made with; else")
    return (f"{out} is where `dvc repro` keeps {stage}'s outputs, and DVC did not make these: `dvc commit -f {stage}` "
            f"records them {record} {again}.")


def earlier(stage: str) -> list[str]:
    """The stages whose outputs `stage` reads, itself or through the stages it reads, each once, earliest first."""
    return list(dict.fromkeys(e for name in BY_NAME[stage].reads for e in (*earlier(name), name)))


def dvc_entry(dvc_file: Path, name: str) -> tuple[list, list] | None:
    """The deps and outs of stage `name` in `dvc_file`; None where it has no such entry (or is no dvc.yaml)."""
    try:
        entry = dvc_file_data(dvc_file.read_text())["stages"][name]
        return entry.get("deps") or [], [next(iter(o)) if isinstance(o, dict) else o for o in entry["outs"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, StopIteration):  # not one of ours
        return None


def kept_by_dvc(stage: str, out: Path) -> bool:
    """Whether `out` is an output of `stage`'s entry in the dvc.yaml of this folder."""
    _, outs = dvc_entry(Path("dvc.yaml"), stage) or ([], [])
    return out.resolve() in {Path(o).resolve() for o in outs if isinstance(o, str)}


def tracked_values(stage: str, cfg: DictConfig, params: dict | None = None) -> dict:
    """The values of the params DVC tracks for `stage` (flattened keys), read from `params` (a params file's),
    else from `cfg`."""
    from transferkit.config.compose import to_params
    from transferkit.config.dvcyaml import tracked_params
    from transferkit.plain import flatten, under

    keys = tracked_params(BY_NAME[stage].params, list(cfg.trainer))
    return {k: v for k, v in flatten(to_params(cfg) if params is None else params).items() if under(k, keys)}


def tracked(stage: str, cfg: DictConfig) -> str:
    """The values of the params DVC tracks for `stage`, and for a fit the processes and precision they resolve to
    here: a killed run's folder is resumed only by a run with the same (a progress bar turned off, or another
    stage's setting changed, discards no training)."""
    from transferkit.training.precision import processes, resolve_precision

    values = tracked_values(stage, cfg)
    if BY_NAME[stage].trains:  # as resolved here: `devices: auto` counts another node's GPUs, and a resume on more
        trainer = cfg.trainer  # processes takes fewer steps an epoch than its schedule was counted in
        values |= {"processes": processes(trainer),
                   "precision": resolve_precision(trainer.get("precision", "auto"), str(trainer.accelerator))}
    return json.dumps(values, sort_keys=True)


def check_files_tracked(stage: str, cfg: DictConfig) -> None:
    """Under `dvc repro` (which sets DVC_STAGE): every file a setting of the stage names (named_files) is a
    dep of the stage's dvc.yaml entry, or DVC would not run the stage again when the file changes. `dvc exp
    run -S` sets such a value in params.yaml without writing dvc.yaml."""
    from transferkit.config.compose import to_params
    from transferkit.errors import TransferkitError

    address = os.environ.get("DVC_STAGE")
    if not address:
        return
    file, _, name = address.rpartition(":")
    dvc_file = Path(os.environ.get("DVC_ROOT", ".")) / (file or "dvc.yaml")
    if (entry := dvc_entry(dvc_file, name)) is None:
        return
    deps, outs = entry
    if name == stage:  # the project's pipeline (a sweep's points name their folders on the command line)
        folders = {"paths.artifacts_dir": f"{cfg.paths.artifacts_dir}/{stage}" not in outs,
                   "paths.data_dir": not BY_NAME[stage].reads and str(cfg.paths.data_dir) not in deps}
        if key := next((k for k, stale in folders.items() if stale), None):
            raise TransferkitError(f"{key}={cfg.paths[key.split('.')[1]]} is not where {name}'s entry in {dvc_file} "
                                   f"has DVC track it, so DVC would record the outputs there against these params "
                                   f"(params.yaml was set without `transferkit params`, as `dvc exp run -S` sets "
                                   f"it). Fix: set it with `transferkit params` (it writes dvc.yaml), then "
                                   f"`dvc repro`.")
    named = named_files(stage, to_params(cfg), dvc_file.parent)
    for key, value in named.items():
        if value not in deps:
            raise TransferkitError(f"{key}={value} names a file that is not among the deps of {name} in {dvc_file}, "
                                   f"so DVC would not run {name} again when that file changes (params.yaml was set "
                                   f"without `transferkit params`, as `dvc exp run -S` sets it). Fix: set it with "
                                   f"`transferkit params` (it writes the dep into dvc.yaml), then `dvc repro`.")
