"""The config's rules between keys (a method and the setting it needs, a device count, a stage's
depths against the model's blocks), each refusing with one message naming the key and the fix;
check_schema (schema.py) first checks each key alone."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferkit.config.compose import find_conf_dir, to_params
from transferkit.config.overrides import as_override
from transferkit.config.schema import check_schema, fail
from transferkit.data.tasks import check_class_list, check_disjoint
from transferkit.distill.losses import get_loss
from transferkit.errors import TransferkitError
from transferkit.models import DATA_INITIALISED, model_from_config
from transferkit.models.fastnet import MAX_STEM_WIDTH
from transferkit.plain import flatten
from transferkit.prune import unstructured
from transferkit.prune.structured import check_no_layer_emptied, check_rates, importance, kept_modules
from transferkit.stages import BY_NAME
from transferkit.training import multi_process

# The structured-only prune keys whose default turns them off (target and round_to have live defaults,
# which unstructured pruning, a share of single weights, ignores).
STRUCTURED_ONLY = {"rates": [], "sparse_epochs": 0, "steps": 1}


def validate(cfg: DictConfig) -> None:
    """Every check that needs no model or data (validate_run adds those that need the model)."""
    if missing := sorted(OmegaConf.missing_keys(cfg)):  # the schema would read '???' as text; OmegaConf raises
        fail(missing[0], "???", "??? is OmegaConf's mark of a value not given, which a run reads as an error")
    params = to_params(cfg)
    splits = [(params.get("data") or {}).get(role) for role in ("source", "target")]
    if not any(isinstance(s, dict) and s.get("dataset") == "synthetic" for s in splits):
        params.get("data", {}).pop("synthetic", None)  # read only when a split is synthetic
    check_schema(params)
    d = cfg.data
    if d.image_size != 32:  # the official CIFAR files are read as they are; model cost and export assume 32
        fail("data.image_size", d.image_size, "the models and CIFAR's own files are 32x32 pixels, the only size")
    for role in ("source", "target"):
        check_class_list(list(d[role].classes), role)
    if d.source.dataset == d.target.dataset:  # other names of one file: prepare checks where they resolve
        check_disjoint(d.source.classes, d.target.classes)
    for key in ("model", "distill.student"):
        if (m := OmegaConf.select(cfg, key)) is not None and m.name == "fastnet" and m.stem_width > MAX_STEM_WIDTH:
            fail(f"{key}.stem_width", m.stem_width, f"fastnet's whitened stem has at most {MAX_STEM_WIDTH} filters")
    if "pretrain" in cfg and cfg.pretrain.epochs == 0 and not cfg.model.get("weights"):
        raise TransferkitError(f"pretrain.epochs=0 passes on published weights untrained, and model '{cfg.model.name}' "
                               f"has none set (model.weights): the backbone would be random. Fix: set pretrain.epochs "
                               f">= 1, or model.weights (model=resnet18 model.weights=IMAGENET1K_V1).")
    for stage in ("pretrain", "scratch"):  # freeze_depth=1 keeps the first block fixed: a random one never learns
        weights = stage == "pretrain" and cfg.model.get("weights")  # published weights initialise it in pretrain
        if stage in cfg and cfg[stage].freeze_depth and cfg.model.name not in DATA_INITIALISED and not weights:
            raise TransferkitError(f"{stage}.freeze_depth={cfg[stage].freeze_depth} keeps the first block fixed, but "
                                   f"model '{cfg.model.name}' starts it at random here (only fastnet's is initialised "
                                   f"from the data; others' from published weights, model.weights, in pretrain). Fix: "
                                   f"set {stage}.freeze_depth=0.")
    if Path(cfg.paths.artifacts_dir).resolve().is_relative_to(Path(cfg.paths.data_dir).resolve()):
        fail("paths.artifacts_dir", cfg.paths.artifacts_dir, f"it must lie outside paths.data_dir="
             f"{cfg.paths.data_dir}, which prepare reads whole: the stages' outputs would be its input (DVC refuses "
             f"such a dvc.yaml)")
    check_devices(cfg.trainer)
    if cfg.trainer.deterministic is True and cfg.trainer.get("benchmark"):  # torch ignores cuDNN's determinism then
        raise TransferkitError("trainer.deterministic=true with trainer.benchmark=true: cuDNN autotuning picks kernels "
                               "by timing them, so reruns are not bit-identical. Fix: add trainer.benchmark=false.")
    if "distill" in cfg:
        get_loss(cfg.distill.method)  # an unknown name -> an error listing the registered methods
        if cfg.distill.mixup and cfg.distill.method != "kd":  # dkd splits its loss by each image's one label
            raise TransferkitError(f"distill.mixup={cfg.distill.mixup} works with distill.method=kd only (a mixed "
                                   f"image has two labels). Fix: set distill.method=kd or distill.mixup=0.")
    if "prune" in cfg:
        importance(cfg.prune.criterion)  # likewise for the pruning criteria
        if cfg.prune.mode == "unstructured":
            unstructured.check_settings(cfg.prune.criterion, cfg.prune.scope)  # those of channels have no weight form
        # unstructured pruning zeroes weights in one shot: a set structured-only key would be ignored
        ignored = [k for k, off in STRUCTURED_ONLY.items() if cfg.prune[k] != off]
        if cfg.prune.mode == "unstructured" and ignored:
            off = ", ".join(f"prune.{k}={STRUCTURED_ONLY[k]}" for k in ignored)
            raise TransferkitError(f"{', '.join(f'prune.{k}={cfg.prune[k]}' for k in ignored)} "
                                   f"{'acts' if len(ignored) == 1 else 'act'} only in "
                                   f"structured pruning, which prune.mode=unstructured ignores. Fix: set "
                                   f"prune.mode=structured, or {off}.")
        # rates that cut nothing are refused as a keep of every layer is: a pruned model no smaller
        if (p := cfg.prune).rates and not any(r for i, r in enumerate(p.rates) if f"blocks.{i}" not in p.keep):
            kept = any(f"blocks.{i}" in p.keep for i in range(len(p.rates)))
            fail("prune.rates", list(p.rates), f"no block{' outside prune.keep' * kept} has a rate above 0, so pruning "
                 f"would remove nothing (1 is the common share; [] gives every block that)")
    if "student" in cfg and "distill" in cfg:  # the baseline trains like distill: the teacher is the only difference
        differ = [k for k in cfg.student if k in cfg.distill and cfg.student[k] != cfg.distill[k]]
        if differ:  # conf/'s student.* follow distill.*: one override sets both, in conf/ and in params.yaml
            both = "; ".join(f"student.{k}={cfg.student[k]!r} vs distill.{k}={cfg.distill[k]!r}" for k in differ)
            # either value may be the one meant: both, each given to both blocks
            alike = [" ".join(f"{b}.{k}={as_override(cfg[a][k])}" for k in differ for b in ("distill", "student"))
                     for a in ("distill", "student")]
            raise TransferkitError(f"the student baseline trains unlike distill ({both}): the comparison would measure "
                                   f"more than the teacher. Fix: give both one value, `{alike[0]}` or `{alike[1]}` "
                                   f"(where conf/ is composed, distill's alone sets both: the student follows it).")
    if cfg.get("transfer", {}).get("unfreeze_every_epochs") and multi_process(cfg.trainer):
        t = cfg.trainer
        raise TransferkitError(f"transfer.unfreeze_every_epochs > 0 is not supported in several processes (strategy "
                               f"{t.strategy}, devices {t.devices}, num_nodes {t.num_nodes}): DDP fixes its parameters "
                               f"at start. Fix: set it to 0, or train in one process (trainer=cpu/gpu, devices=1).")
    if cfg.get("transfer", {}).get("unfreeze_every_epochs") and cfg.transfer.backbone_lr_mult == 0:
        # a zero backbone rate keeps every block frozen: unfreezing would only let BatchNorm statistics drift
        raise TransferkitError(f"transfer.unfreeze_every_epochs={cfg.transfer.unfreeze_every_epochs} unfreezes blocks "
                               f"that transfer.backbone_lr_mult=0 keeps frozen. Fix: set transfer.backbone_lr_mult > 0 "
                               f"for gradual unfreezing, or transfer.unfreeze_every_epochs=0 for a frozen backbone.")
    if (every := cfg.get("transfer", {}).get("unfreeze_every_epochs")) and every >= cfg.transfer.epochs and max(
            [cfg.transfer.freeze_depth, *cfg.get("freeze_curve", {}).get("depths", [])]) > 0:
        # the first block thaws as epoch `every` starts (0 first): a run of no more epochs keeps its depth throughout
        raise TransferkitError(f"transfer.unfreeze_every_epochs={every} unfreezes a first block after epoch {every}, "
                               f"and transfer.epochs={cfg.transfer.epochs}: every block frozen at the start stays "
                               f"frozen, a fixed freeze under another name. Fix: set it below transfer.epochs, or to 0 "
                               f"for a fixed freeze.")
    if "freeze_curve" in cfg and len(set(cfg.freeze_curve.depths)) != len(cfg.freeze_curve.depths):
        fail("freeze_curve.depths", list(cfg.freeze_curve.depths), "lists a depth twice")


def check_devices(trainer: DictConfig) -> None:
    """trainer.devices as Lightning reads it (a count, -1 or auto, or distinct device ids: a list or "0,1"),
    ids only on an accelerator that has them; trainer.strategy a name Lightning registers."""
    devices, ids = trainer.devices, None
    if OmegaConf.is_list(devices):
        ids = list(devices)
    elif isinstance(devices, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)+,?\s*|\s*\d+\s*,\s*", devices):
        ids = [int(i) for i in devices.split(",") if i.strip()]
    text = str(devices).strip()  # an int or a string as Lightning reads them; a bool, float or list is no count
    count = devices == "auto" or (text == "-1" and trainer.accelerator != "cpu") or (text.isdecimal() and int(text) > 0)
    distinct_ids = ids and all(type(i) is int and i >= 0 for i in ids) and len(set(ids)) == len(ids)
    if not count and not (distinct_ids and trainer.accelerator != "cpu"):
        fail("trainer.devices", devices, "must be a count >= 1, auto, or on a GPU -1 (every device) or distinct "
             "device ids (a list, or \"0,1\"); a CPU takes a count or auto")
    if trainer.strategy not in ("auto", "ddp"):
        from pytorch_lightning.strategies import StrategyRegistry

        if trainer.strategy not in StrategyRegistry:
            fail("trainer.strategy", trainer.strategy, f"must be auto or a strategy Lightning registers: "
                 f"{', '.join(sorted(StrategyRegistry.available_strategies()))}")


# The block depths each stage takes (key, values), checked once the model's block count is known.
DEPTHS = {"transfer": lambda cfg: ("transfer.freeze_depth", [cfg.transfer.freeze_depth]),
          "freeze_curve": lambda cfg: ("freeze_curve.depths", list(cfg.freeze_curve.depths)),
          "probe": lambda cfg: ("probe.depth", [d for d in [cfg.probe.depth] if d is not None])}


def check_frozen_sweep(runs: list[DictConfig]) -> None:
    """Runs (a sweep's points, scenarios' transfer strategies) that differ in transfer.freeze_depth under
    transfer.backbone_lr_mult=0 are one run: no block has a learning rate, so each depth trains the linear
    probe again under another label."""
    if len(depths := sorted({c.transfer.freeze_depth for c in runs if c.transfer.backbone_lr_mult == 0})) > 1:
        raise TransferkitError(f"transfer.backbone_lr_mult=0 keeps every block frozen whatever transfer.freeze_depth, "
                               f"so the runs with depths {depths} would train one model, the linear probe, under "
                               f"{len(depths)} labels. Fix: set transfer.backbone_lr_mult > 0, or run one depth.")


def validate_depths(cfg: DictConfig, stage: str, num_blocks: int) -> None:
    """The stage's block depths against the model's block count (0..n; a probe needs >= 1)."""
    key, depths = DEPTHS[stage](cfg)
    if stage == "freeze_curve" and depths and cfg.transfer.backbone_lr_mult == 0:
        fail(key, depths, "transfer.backbone_lr_mult=0 keeps every block frozen whatever the depth, so each point "
             "would train the same model under another label; set freeze_curve.depths=[] (no curve) or "
             "transfer.backbone_lr_mult > 0")
    if too_deep := [k for k in depths if k > num_blocks]:
        fail(key, depths if stage == "freeze_curve" else depths[0], f"model '{cfg.model.name}' has {num_blocks} "
             f"blocks, so every depth must be in {int(stage == 'probe')}..{num_blocks} ({too_deep} is not)")


def validate_run(cfg: DictConfig, stage: str | None, blocks: dict[str, int], all_stages: bool = False) -> None:
    """Every check a run of `stage` (with `all_stages`, of every stage) can pass before it loads data:
    `validate`, the networks built (model, distill.student), and the stages' depths against the model's
    block count (`blocks` caches it per model config)."""
    validate(cfg)

    def num_blocks(key: str) -> int:
        model_cfg = to_params(OmegaConf.select(cfg, key))
        if repr(model_cfg) not in blocks:  # building a model is cheap, but not free
            blocks[repr(model_cfg)] = model_from_config(model_cfg, 2, key=key, fetch_weights=False).num_blocks
        return blocks[repr(model_cfg)]

    n = {key: num_blocks(key) for key in ("model", "distill.student") if OmegaConf.select(cfg, key) is not None}
    for name in [s for s in DEPTHS if s in cfg] if all_stages else [stage] if stage in DEPTHS else []:
        validate_depths(cfg, name, n["model"])
    per_class = cfg.data.target.get("train_per_class")  # None: all a class has, known once prepare has read them
    if "quantize" in cfg and per_class and (all_stages or stage == "quantize") and cfg.quantize.calibration_images > (
            count := per_class * len(cfg.data.target.classes)):
        fail("quantize.calibration_images", cfg.quantize.calibration_images, f"the target task has {count} training "
             f"images to calibrate on ({per_class} per class), so it must be in 1..{count}")
    if "prune" in cfg and "distill.student" in n and (all_stages or stage == "prune"):  # not after hours of training
        student = model_from_config(to_params(cfg.distill.student), 2, key="distill.student", fetch_weights=False)
        kept_modules(student, list(cfg.prune.keep))
        check_rates(student, list(cfg.prune.rates))
        p = cfg.prune
        if p.mode == "structured" and p.target == "channels" and p.scope == "layer":  # as prune_channels checks it
            check_no_layer_emptied(student, p.ratio, list(p.keep), list(p.rates))
    if all_stages:  # DVC would stop at a missing file only at its stage, after the stages before it trained
        # DVC runs a stage in its dvc.yaml's folder (DVC_ROOT is the repository's, or the workspace of a queued run)
        flat, root = flatten(to_params(cfg)), Path.cwd() if os.environ.get("DVC_STAGE") else find_conf_dir().parent
        artifacts = Path(os.path.abspath(root / str(cfg.paths.artifacts_dir)))
        for key in dict.fromkeys(key for s in BY_NAME.values() for key in s.files):
            if (value := flat.get(key)) and not (root / str(value)).is_file():
                fail(key, value, f"no such file (a path in the project {root}, or an absolute one)")
            readers = after = {s.name for s in BY_NAME.values() if key in s.files}
            while later := {s.name for s in BY_NAME.values() if after & set(s.reads)} - after:
                after = after | later
            # DVC refuses a stage that reads what it, or a stage after it, writes (a cycle)
            if value and (owner := next((s for s in sorted(after) if Path(os.path.abspath(root / str(value)))
                                         .is_relative_to(artifacts / s)), None)):
                raise TransferkitError(f"{key}={value} lies in the {owner} stage's outputs, and {owner} reads {key} or "
                                       f"comes after a stage that does ({', '.join(sorted(readers))}): dvc.yaml cannot "
                                       f"make a stage read what it or a later stage writes. Fix: copy the file out of "
                                       f"{artifacts / owner} (to models/, say) and set {key} to the copy.")
