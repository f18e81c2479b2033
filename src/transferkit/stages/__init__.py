"""The pipeline, declared once: every stage, the stages whose outputs it reads, and the settings
that configure it. dvc.yaml is generated from this table (`transferkit params`, with the code each
stage imports as its deps), the CLI and evaluate take their lists from it, and a stage module is
handed its inputs' folders: it never computes another stage's folder.

Each stage is a module here with `run(cfg, inputs, out)`: `inputs` maps each name in `reads` to
that stage's output folder. Adding a stage is one entry below plus one module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    uses: tuple[str, ...] = ()      # what it reads of earlier stages' outputs: STAGE/FILE, or STAGE (the whole folder)
    params: tuple[str, ...] = ()    # the config keys that change what it computes (DVC's params)
    trains: bool = False            # fits models with an optimisation block (conf/optim/)
    target_model: bool = False      # writes a model.pt for the target task that evaluate scores
    module: str = ""                # its code, if not transferkit.stages.<name>
    command: str = ""               # its dvc.yaml command, if not `transferkit NAME --params params.yaml`
    files: tuple[str, ...] = ()     # config keys that may name a file it reads (a dep when set)
    datasets: tuple[str, ...] = ()  # config keys naming a dataset: a file it reads where a path outside data_dir

    @property
    def reads(self) -> tuple[str, ...]:
        """The stages whose outputs it reads, by name."""
        return tuple(dict.fromkeys(use.split("/")[0] for use in self.uses))


COMMON = ("seed", "trainer")
# prune's recovery settings, with the distillation settings it uses (stages/distill.py: distillation)
PRUNE_PARAMS = ("prune", "distill.method", "distill.temperature", "distill.alpha", "distill.dkd_alpha",
                "distill.dkd_beta", "distill.mixup")
PIPELINE = (
    Stage("prepare", params=("seed", "data", "paths.data_dir"),
          datasets=("data.source.dataset", "data.target.dataset")),
    Stage("pretrain", ("prepare/source.pt",), (*COMMON, "model", "pretrain"), trains=True),
    Stage("transfer", ("prepare/target.pt", "pretrain/model.pt"), (*COMMON, "model", "transfer"), trains=True,
          target_model=True),
    Stage("probe", ("prepare/target.pt", "pretrain/model.pt"), (*COMMON, "model", "probe"), trains=True,
          target_model=True),
    Stage("scratch", ("prepare/target.pt",), (*COMMON, "model", "scratch"), trains=True, target_model=True),
    Stage("distill", ("prepare/target.pt", "transfer/model.pt"), (*COMMON, "distill"), trains=True,
          target_model=True, files=("distill.student_init",)),
    # the distillation baseline: the same student and budget, no teacher
    Stage("student", ("prepare/target.pt",), (*COMMON, "distill.student", "distill.student_init", "student"),
          trains=True, target_model=True, files=("distill.student_init",)),
    # the distillation settings the recovery fine-tune uses (stages/distill.py: distillation)
    Stage("prune", ("prepare/target.pt", "transfer/model.pt", "distill/model.pt"), (*COMMON, *PRUNE_PARAMS),
          trains=True, target_model=True),
    # the deployable model: ONNX + TorchScript, checked against PyTorch on the test set
    Stage("export", ("prune/model.pt", "prepare/target.pt"), module="transferkit.deploy.export",
          command="transferkit export {prune}/model.pt --out {out} --test-set {prepare}/target.pt"),
    # the deployable model in INT8, calibrated on training images, checked against fp32; past
    # quantize.max_drop, fine-tuned for INT8 (distilled from the teacher, as prune recovers) and quantized again
    Stage("quantize", ("export/model.onnx", "prepare/target.pt", "prune/model.pt", "transfer/model.pt"),
          (*COMMON, "quantize", *PRUNE_PARAMS)),
    # accuracy vs freeze depth: the transfer recipe at each of freeze_curve.depths
    Stage("freeze_curve", ("prepare/target.pt", "pretrain/model.pt"), (*COMMON, "model", "transfer", "freeze_curve"),
          trains=True),
    # every model's metrics, timings and costs: whole folders
    Stage("evaluate", ("prepare", "pretrain", "scratch", "probe", "transfer", "student", "distill", "prune",
                       "freeze_curve", "export", "quantize"),
          ("name", "evaluate", "freeze_curve", "transfer.freeze_depth", "probe.depth", "trainer.accelerator")),
)

BY_NAME = {s.name: s for s in PIPELINE}
STAGES = tuple(s.name for s in PIPELINE)
# The models evaluate scores, baselines first: the order of the report's tables.
TARGET_MODELS = tuple(name for name in BY_NAME["evaluate"].reads if BY_NAME[name].target_model)


def module_of(stage: str) -> str:
    return BY_NAME[stage].module or f"transferkit.stages.{stage}"


def inputs_of(stage: str, artifacts_dir) -> dict:
    """Where a stage finds what it reads when it runs in a project: artifacts/<stage>/."""
    from pathlib import Path

    return {name: Path(artifacts_dir) / name for name in BY_NAME[stage].reads}


def input_deps(stage: str, folders: dict) -> list[str]:
    """The paths of what `stage` reads in the input `folders` given (by stage), as its deps: the files where it
    reads files, so a rerun upstream that remakes them byte for byte (its timings differ) reruns nothing here."""
    return [f"{folders[name]}/{file}" if file else str(folders[name])
            for name, _, file in (use.partition("/") for use in BY_NAME[stage].uses) if name in folders]


def named_files(stage: str, params: dict, root=None) -> dict[str, str]:
    """The files a stage's settings name, by key: its `files` where set, and its `datasets` where read from
    outside paths.data_dir (a dataset's name, cifar10 or a folder there, is read through data_dir's dep,
    whatever a link there points to). They are deps of its dvc.yaml entry, and it reads them as it reads its
    input folders. Relative paths are read as the stage reads them, from `root` (the project; default: here)."""
    import os
    from pathlib import Path

    from transferkit.plain import flatten

    flat = flatten(params)
    named = {key: str(flat[key]) for key in BY_NAME[stage].files if flat.get(key)}
    root = Path(root or ".")
    data_dir = Path(os.path.abspath(root / str(flat.get("paths.data_dir") or "data")))
    if BY_NAME[stage].datasets:
        from transferkit.data.resolve import dataset_location
    for key in BY_NAME[stage].datasets:
        name = flat.get(key)
        if not name or name == "synthetic":  # synthetic images: made, not read
            continue
        # where prepare reads it from, by that path, not a link's target; an absolute path not there yet, as given
        where = dataset_location(str(name), data_dir, root) or (Path(name) if Path(name).is_absolute() else None)
        if where is None:  # a CIFAR name to download, or a relative path found nowhere (prepare says so)
            continue
        where = Path(os.path.abspath(where))
        if data_dir != where and data_dir not in where.parents:
            named[key] = str(name)
    return named
