"""Check every value a stage will use before any data is loaded or training starts.

Hydra already refuses unknown keys in overrides (struct mode); this catches impossible
values, each with a message that names the key and the fix.
"""

from __future__ import annotations

from omegaconf import DictConfig

from transferkit.data.augment import FLIP_MODES
from transferkit.errors import TransferkitError
from transferkit.evaluation.metrics import TTA

TRAIN_STAGES = ("pretrain", "transfer", "probe", "scratch", "distill", "prune")


def _fail(key: str, value, need: str) -> None:
    raise TransferkitError(f"{key}={value!r} is invalid: {need}. Fix: set {key} in conf/ or as an override.")


def _check_number(cfg, key: str, *, low=None, high=None, low_open=False, integer=False, allow_none=False):
    node, *path = key.split(".")
    value = cfg[node]
    for p in path:
        value = value[p]
    if value is None and allow_none:
        return
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        _fail(key, value, "must be an integer")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(key, value, "must be a number")
    if low is not None and (value <= low if low_open else value < low):
        _fail(key, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        _fail(key, value, f"must be <= {high}")


def validate_train(cfg: DictConfig, stage: str) -> None:
    # pretrain.epochs=0 exports published weights (model.weights) without source training
    _check_number(cfg, f"{stage}.epochs", low=0 if stage == "pretrain" else 1, integer=True)
    _check_number(cfg, f"{stage}.batch_size", low=1, integer=True)
    _check_number(cfg, f"{stage}.lr", low=0, low_open=True)
    _check_number(cfg, f"{stage}.momentum", low=0, high=1)
    _check_number(cfg, f"{stage}.weight_decay", low=0)
    _check_number(cfg, f"{stage}.label_smoothing", low=0, high=1)
    _check_number(cfg, f"{stage}.warmup_fraction", low=0, high=1)
    _check_number(cfg, f"{stage}.translate", low=0, high=8, integer=True)
    _check_number(cfg, f"{stage}.warmup_from", low=0, high=1)
    _check_number(cfg, f"{stage}.decay_to", low=0, high=1)
    _check_number(cfg, f"{stage}.bn_bias_lr_mult", low=0, low_open=True)
    _check_choice(cfg, f"{stage}.flip", FLIP_MODES)
    for key in ("bn_bias_decay", "lookahead"):
        _check_choice(cfg, f"{stage}.{key}", (True, False))


def _check_choice(cfg, key: str, choices) -> None:
    node, *path = key.split(".")
    value = cfg[node]
    for p in path:
        value = value[p]
    if value not in choices or (isinstance(value, (bool, int)) and type(value) is not type(choices[0])):
        _fail(key, value, f"must be one of {list(choices)}")


def validate_data(cfg: DictConfig) -> None:
    d = cfg.data
    for role in ("source", "target"):
        _check_number(cfg, f"data.{role}.train_per_class", low=1, integer=True, allow_none=True)
        _check_number(cfg, f"data.{role}.val_per_class", low=0, integer=True)
        _check_number(cfg, f"data.{role}.test_per_class", low=1, integer=True, allow_none=True)
    if d.source.dataset == d.target.dataset:
        both = sorted(set(d.source.classes) & set(d.target.classes))
        if both:
            raise TransferkitError(
                f"classes {both} are in both data.source.classes and data.target.classes: the target "
                f"test images of a class the backbone was pretrained on would leak. Fix: remove them "
                f"from one of the two lists.")
    if "synthetic" in (d.source.dataset, d.target.dataset):
        _check_number(cfg, "data.synthetic.train_per_class", low=1, integer=True)
        _check_number(cfg, "data.synthetic.test_per_class", low=1, integer=True)


def validate_transfer(cfg: DictConfig, num_blocks: int) -> None:
    _check_number(cfg, "transfer.backbone_lr_mult", low=0)
    _check_number(cfg, "transfer.unfreeze_every_epochs", low=0, integer=True)
    _check_number(cfg, "transfer.freeze_depth", low=0, integer=True)
    if cfg.transfer.freeze_depth > num_blocks:
        _fail("transfer.freeze_depth", cfg.transfer.freeze_depth,
              f"model '{cfg.model.name}' has {num_blocks} blocks, so it must be in 0..{num_blocks}")
    if cfg.transfer.unfreeze_every_epochs and cfg.trainer.strategy not in ("auto", None, "single_device"):
        raise TransferkitError("transfer.unfreeze_every_epochs > 0 is not supported with strategy "
                               f"'{cfg.trainer.strategy}' (DDP fixes its parameter set at start). Fix: set "
                               "transfer.unfreeze_every_epochs=0 or use trainer=cpu/gpu.")


def validate_freeze_curve(cfg: DictConfig, num_blocks: int | None = None) -> None:
    """freeze_curve.depths: distinct integers, each a valid transfer.freeze_depth (the block
    count is known once the backbone is loaded)."""
    from omegaconf import ListConfig

    depths = cfg.freeze_curve.depths
    if not isinstance(depths, (list, ListConfig)):
        _fail("freeze_curve.depths", depths, "must be a list of block counts, e.g. [0, 2, 3, 4] (or [])")
    for k in depths:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            _fail("freeze_curve.depths", list(depths), f"{k!r} is not a block count (an integer >= 0)")
    if len(set(depths)) != len(depths):
        _fail("freeze_curve.depths", list(depths), "lists a depth twice")
    too_deep = [k for k in depths if num_blocks is not None and k > num_blocks]
    if too_deep:
        _fail("freeze_curve.depths", list(depths), f"model '{cfg.model.name}' has {num_blocks} blocks, so "
              f"every depth must be in 0..{num_blocks} ({too_deep} is not)")


def validate_scratch(cfg: DictConfig) -> None:
    for stage in ("pretrain", "scratch"):
        _check_number(cfg, f"{stage}.freeze_depth", low=0, high=1, integer=True)


def validate_probe(cfg: DictConfig, num_blocks: int) -> None:
    _check_number(cfg, "probe.depth", low=1, integer=True, allow_none=True)
    if cfg.probe.depth is not None and cfg.probe.depth > num_blocks:
        _fail("probe.depth", cfg.probe.depth, f"model '{cfg.model.name}' has {num_blocks} blocks, so it "
              f"must be in 1..{num_blocks} or null")


def validate_distill(cfg: DictConfig) -> None:
    from transferkit.distill.losses import get_loss

    get_loss(cfg.distill.method)  # unknown name -> error listing the registered methods
    _check_number(cfg, "distill.temperature", low=0, low_open=True)
    _check_number(cfg, "distill.alpha", low=0, high=1)
    _check_number(cfg, "distill.dkd_alpha", low=0)
    _check_number(cfg, "distill.dkd_beta", low=0)


def validate_prune(cfg: DictConfig) -> None:
    from transferkit.prune.structured import CRITERIA

    p = cfg.prune
    if p.mode not in ("structured", "unstructured"):
        _fail("prune.mode", p.mode, "must be 'structured' or 'unstructured'")
    if p.criterion not in CRITERIA:
        raise TransferkitError(f"unknown prune.criterion '{p.criterion}'. Fix: use one of {sorted(CRITERIA)}.")
    if p.target not in ("macs", "channels"):
        _fail("prune.target", p.target, "must be 'macs' or 'channels'")
    _check_number(cfg, "prune.ratio", low=0, low_open=True)
    if p.ratio >= 1:
        _fail("prune.ratio", p.ratio, "must be in (0, 1): the share of MACs, channels or weights removed")
    _check_number(cfg, "prune.steps", low=1, integer=True)
    _check_number(cfg, "prune.round_to", low=1, integer=True, allow_none=True)


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", "16-true")


def validate_trainer(cfg: DictConfig) -> None:
    from transferkit.training import LOGGERS

    _check_choice(cfg, "trainer.precision", PRECISIONS)
    _check_number(cfg, "trainer.checkpoint_budget", low=0, high=1)
    for name in cfg.trainer.get("loggers") or []:
        if name not in LOGGERS:
            raise TransferkitError(f"unknown logger '{name}' in trainer.loggers. Fix: use any of {list(LOGGERS)}.")
    if cfg.trainer.sync_batchnorm and cfg.trainer.accelerator == "cpu":
        raise TransferkitError("trainer.sync_batchnorm=true works only on GPUs (torch's SyncBatchNorm). "
                               "Fix: set trainer.sync_batchnorm=false for CPU processes.")


def validate(cfg: DictConfig) -> None:
    """Checks that need no model or data; stage-specific ones run in each stage."""
    validate_trainer(cfg)
    validate_scratch(cfg)
    if "freeze_curve" in cfg:
        validate_freeze_curve(cfg)
    if "distill" in cfg:
        validate_distill(cfg)
    if "prune" in cfg:
        validate_prune(cfg)
    _check_number(cfg, "seed", low=0, integer=True)
    validate_data(cfg)
    for stage in TRAIN_STAGES:
        if stage in cfg:
            validate_train(cfg, stage)
    _check_choice(cfg, "evaluate.tta", TTA)
    _check_number(cfg, "evaluate.latency_repeats", low=1, integer=True)
    _check_number(cfg, "evaluate.throughput_batch", low=1, integer=True)
    _check_number(cfg, "evaluate.batch_size", low=1, integer=True)
