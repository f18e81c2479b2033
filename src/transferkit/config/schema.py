"""The config's schema: each block a dataclass whose fields carry their type and allowed values,
checked before any data is loaded or training starts. Hydra already refuses unknown keys
(struct mode); this refuses impossible values, each with one message naming the key and the fix.
The checks that need a model (how many blocks it has) run in the stage that builds it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import get_type_hints

from omegaconf import DictConfig, ListConfig

from transferkit.errors import TransferkitError

from transferkit.data.augment import FLIP_MODES  # noqa: E402
from transferkit.deploy.quantize import FORMATS as QUANTIZE_FORMATS, METHODS as QUANTIZE_METHODS  # noqa: E402
from transferkit.evaluation.metrics import TTA as TTA_MODES  # noqa: E402
from transferkit.prune.structured import SCOPES  # noqa: E402

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", "16-true")


def rule(low=None, high=None, *, open_low: bool = False, open_high: bool = False, choices: tuple = (),
         optional: bool = False):
    return field(default=None, metadata={"low": low, "high": high, "open_low": open_low, "open_high": open_high,
                                         "choices": choices, "optional": optional})


def fail(key: str, value, need: str):
    raise TransferkitError(f"{key}={value!r} is invalid: {need}. Fix: set {key} in conf/ or as an override.")


def check_value(key: str, value, kind: type, m: dict) -> None:
    if value is None and m.get("optional"):
        return
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        fail(key, value, "must be an integer")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        fail(key, value, "must be a number")
    if kind is bool and not isinstance(value, bool):
        fail(key, value, "must be true or false")
    if m.get("choices") and value not in m["choices"]:
        fail(key, value, f"must be one of {list(m['choices'])}")
    low, high = m.get("low"), m.get("high")
    if low is not None and (value <= low if m["open_low"] else value < low):
        fail(key, value, f"must be {'>' if m['open_low'] else '>='} {low}")
    if high is not None and (value >= high if m.get("open_high") else value > high):
        fail(key, value, f"must be {'<' if m.get('open_high') else '<='} {high}")


def check(schema, node: DictConfig, prefix: str) -> None:
    for f, kind in ((f, get_type_hints(schema)[f.name]) for f in fields(schema)):
        if f.name in node:
            check_value(f"{prefix}.{f.name}", node[f.name], kind, f.metadata)


@dataclass
class Optim:  # conf/optim/sgd.yaml
    epochs: int = rule(1)
    batch_size: int = rule(1)
    lr: float = rule(0, open_low=True)
    momentum: float = rule(0, 1)
    weight_decay: float = rule(0)
    label_smoothing: float = rule(0, 1)
    warmup_fraction: float = rule(0, 1)
    warmup_from: float = rule(0, 1)
    decay_to: float = rule(0, 1)
    bn_bias_lr_mult: float = rule(0, open_low=True)
    bn_bias_decay: bool = rule()
    lookahead: bool = rule()
    flip: str = rule(choices=FLIP_MODES)
    translate: int = rule(0, 8)


@dataclass
class Pretrain(Optim):
    epochs: int = rule(0)  # 0 exports published weights (model.weights) without source training
    freeze_depth: int = rule(0, 1)
    tta: str = rule(choices=TTA_MODES)


@dataclass
class Transfer(Optim):
    freeze_depth: int = rule(0)
    backbone_lr_mult: float = rule(0)
    unfreeze_every_epochs: int = rule(0)


@dataclass
class Scratch(Optim):
    freeze_depth: int = rule(0, 1)


@dataclass
class Probe(Optim):
    depth: int = rule(1, optional=True)


@dataclass
class Distill(Optim):
    temperature: float = rule(0, open_low=True)
    alpha: float = rule(0, 1)
    dkd_alpha: float = rule(0)
    dkd_beta: float = rule(0)
    mixup: float = rule(0)


@dataclass
class Prune(Optim):
    mode: str = rule(choices=("structured", "unstructured"))
    target: str = rule(choices=("macs", "channels"))
    scope: str = rule(choices=tuple(SCOPES))
    teacher: str = rule(choices=("transfer", "student"))
    ratio: float = rule(0, 1, open_low=True, open_high=True)  # the share of MACs, channels or weights removed
    steps: int = rule(1)
    round_to: int = rule(1, optional=True)
    sparse_epochs: int = rule(0)
    sparse_reg: float = rule(0)


@dataclass
class Split:  # data.source / data.target
    train_per_class: int = rule(1, optional=True)
    val_per_class: int = rule(0)
    test_per_class: int = rule(1, optional=True)


@dataclass
class Trainer:
    precision: str = rule(choices=PRECISIONS)
    checkpoint_budget: float = rule(0, 1)


@dataclass
class Quantize:
    calibration_images: int = rule(1)
    method: str = rule(choices=QUANTIZE_METHODS)
    format: str = rule(choices=QUANTIZE_FORMATS)
    per_channel: bool = rule()
    max_drop: float = rule(0, 1)
    qat_epochs: int = rule(0)
    qat_lr: float = rule(0, open_low=True)


@dataclass
class Evaluate:
    tta: str = rule(choices=TTA_MODES)
    latency_repeats: int = rule(1)
    throughput_batch: int = rule(1)
    batch_size: int = rule(1)


# The structured-only prune keys whose default turns them off (criterion, round_to, ... have live defaults).
STRUCTURED_ONLY = {"rates": [], "sparse_epochs": 0, "steps": 1}

BLOCKS = {"pretrain": Pretrain, "transfer": Transfer, "probe": Probe, "scratch": Scratch, "distill": Distill,
          "student": Optim, "prune": Prune, "quantize": Quantize, "trainer": Trainer, "evaluate": Evaluate}


def validate(cfg: DictConfig) -> None:
    """Every check that needs no model or data (validate_run adds those that need the model)."""
    from transferkit.distill.losses import get_loss
    from transferkit.prune.structured import importance
    from transferkit.training import LOGGERS, multi_process

    check_value("seed", cfg.seed, int, {"low": 0, "open_low": False})
    for name, schema in BLOCKS.items():
        if name in cfg:
            check(schema, cfg[name], name)
    for role in ("source", "target"):
        check(Split, cfg.data[role], f"data.{role}")
    d = cfg.data
    if d.image_size != 32:  # the official CIFAR files are read as they are; model cost and export assume 32
        fail("data.image_size", d.image_size, "the models and CIFAR's own files are 32x32 pixels, the only size "
             "supported")
    if d.source.dataset == d.target.dataset and (both := sorted(set(d.source.classes) & set(d.target.classes))):
        raise TransferkitError(f"classes {both} are in both data.source.classes and data.target.classes: the target "
                               f"test images of a class the backbone was pretrained on would leak. Fix: remove them "
                               f"from one of the two lists.")
    if "synthetic" in (d.source.dataset, d.target.dataset):
        for key in ("train_per_class", "test_per_class"):
            check_value(f"data.synthetic.{key}", d.synthetic[key], int, {"low": 1, "open_low": False})
    for name in cfg.trainer.get("loggers") or []:
        if name not in LOGGERS:
            raise TransferkitError(f"unknown logger '{name}' in trainer.loggers. Fix: use any of {list(LOGGERS)}.")
    if cfg.trainer.sync_batchnorm and cfg.trainer.accelerator == "cpu":
        raise TransferkitError("trainer.sync_batchnorm=true works only on GPUs (torch's SyncBatchNorm). "
                               "Fix: set trainer.sync_batchnorm=false for CPU processes.")
    if "distill" in cfg:
        get_loss(cfg.distill.method)  # an unknown name -> an error listing the registered methods
        if cfg.distill.mixup and cfg.distill.method != "kd":  # dkd splits its loss by each image's one label
            raise TransferkitError(f"distill.mixup={cfg.distill.mixup} works with distill.method=kd only (a mixed "
                                   f"image has two labels). Fix: set distill.method=kd or distill.mixup=0.")
    if "prune" in cfg:
        importance(cfg.prune.criterion)  # likewise for the pruning criteria
        rates = cfg.prune.rates
        if not isinstance(rates, (list, ListConfig)):
            fail("prune.rates", rates, "must be a list of numbers >= 0, one per block of the model (or [])")
        for rate in rates:
            check_value("prune.rates", rate, float, {"low": 0, "open_low": False})
        # unstructured pruning zeroes weights in one shot: a set structured-only key would be ignored
        ignored = [k for k, off in STRUCTURED_ONLY.items() if cfg.prune[k] != off]
        if cfg.prune.mode == "unstructured" and ignored:
            raise TransferkitError(f"{', '.join(f'prune.{k}={cfg.prune[k]}' for k in ignored)} act only in structured "
                                   f"pruning, and prune.mode=unstructured would ignore them. Fix: set "
                                   f"prune.mode=structured, or {', '.join(f'prune.{k}={STRUCTURED_ONLY[k]}' for k in ignored)}.")
    if "student" in cfg and "distill" in cfg:  # the baseline trains like distill: the teacher is the only difference
        differ = [f"student.{k}={cfg.student[k]!r} vs distill.{k}={cfg.distill[k]!r}"
                  for k in cfg.student if k in cfg.distill and cfg.student[k] != cfg.distill[k]]
        if differ:
            raise TransferkitError(f"the student baseline trains unlike distill ({'; '.join(differ)}): the comparison "
                                   f"would measure more than the teacher. Fix: set the same values for both.")
    if cfg.get("transfer", {}).get("unfreeze_every_epochs") and multi_process(cfg.trainer):
        raise TransferkitError("transfer.unfreeze_every_epochs > 0 is not supported with strategy "
                               f"'{cfg.trainer.strategy}' (DDP fixes its parameter set at start). Fix: set "
                               "transfer.unfreeze_every_epochs=0 or use trainer=cpu/gpu.")
    if "freeze_curve" in cfg:
        depths = cfg.freeze_curve.depths
        if not isinstance(depths, (list, ListConfig)):
            fail("freeze_curve.depths", depths, "must be a list of block counts, e.g. [0, 2, 3, 4] (or [])")
        for k in depths:
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                fail("freeze_curve.depths", list(depths), f"{k!r} is not a block count (an integer >= 0)")
        if len(set(depths)) != len(depths):
            fail("freeze_curve.depths", list(depths), "lists a depth twice")


# The block depths each stage takes (key, values), checked once the model's block count is known.
DEPTHS = {"transfer": lambda cfg: ("transfer.freeze_depth", [cfg.transfer.freeze_depth]),
          "freeze_curve": lambda cfg: ("freeze_curve.depths", list(cfg.freeze_curve.depths)),
          "probe": lambda cfg: ("probe.depth", [d for d in [cfg.probe.depth] if d is not None])}


def validate_depths(cfg: DictConfig, stage: str, num_blocks: int) -> None:
    """The stage's block depths against the model's block count (0..n; a probe needs >= 1)."""
    key, depths = DEPTHS[stage](cfg)
    if too_deep := [k for k in depths if k > num_blocks]:
        fail(key, depths if stage == "freeze_curve" else depths[0], f"model '{cfg.model.name}' has {num_blocks} "
             f"blocks, so every depth must be in {int(stage == 'probe')}..{num_blocks} ({too_deep} is not)")


def validate_run(cfg: DictConfig, stage: str | None, blocks: dict[str, int]) -> None:
    """Every check a run of `stage` can pass before it loads data: `validate`, and the stage's
    depths against the model's block count (`blocks` caches it per model config)."""
    validate(cfg)
    if stage in DEPTHS:
        from transferkit.config.compose import to_params
        from transferkit.models import model_from_config

        model_cfg = to_params(cfg.model)
        key = repr(model_cfg)
        if key not in blocks:  # building a model is cheap, but not free
            blocks[key] = model_from_config(model_cfg, 2).num_blocks
        validate_depths(cfg, stage, blocks[key])
