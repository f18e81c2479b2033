"""The config's schema: pydantic models whose fields carry each key's type and allowed values,
checked before any data is loaded or training starts. Hydra already refuses unknown keys
(struct mode); this refuses impossible values, each with one message naming the key and the fix.
The rules between keys, and those that need a model, are in checks.py."""

from __future__ import annotations

import difflib
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from transferkit.config.overrides import SETTING_FIX
from transferkit.data.augment import FLIP_MODES
from transferkit.deploy.quantize import FORMATS as QUANTIZE_FORMATS, METHODS as QUANTIZE_METHODS
from transferkit.errors import TransferkitError
from transferkit.evaluation.metrics import TTA as TTA_MODES
from transferkit.models.fastnet import ACTIVATIONS
from transferkit.plain import flatten
from transferkit.prune.structured import SCOPES
from transferkit.training import LOGGERS

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", "16-true")
LIGHTNING_SHORT = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}  # its aliases: spelled out
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def rule(**limits):
    """A key that may be absent (the blocks a config has differ) but, when set, obeys `limits`."""
    return Field(None, **limits)


class Schema(BaseModel):
    # strict: no bool for a number or "3" for an int; forbid: a key conf/ lacks (added by `+key=value`) is
    # read by no stage, so a typo would pass unnoticed
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)  # .inf: a run that trains NaN


Names = list[str]  # a YAML list: a bare string would be read as its letters


class Model(Schema):  # conf/model/: model and distill.student; the builders check which keys a network takes
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    name: str = rule()
    widths: list[Annotated[int, Field(ge=1)]] = rule(min_length=1)
    stem_width: int = rule(ge=1)
    fc_width: int = rule(ge=1)
    width_mult: float = rule(gt=0)
    bn_momentum: float = rule(gt=0, le=1)  # 0: BatchNorm's running statistics never move from 0 and 1
    dirac_init: bool = rule()
    activation: Literal[tuple(ACTIVATIONS)] = rule()
    weights: Optional[str] = rule()


class Optim(Schema):  # conf/optim/sgd.yaml
    epochs: int = rule(ge=1)
    batch_size: int = rule(ge=1)
    lr: float = rule(gt=0)
    momentum: float = rule(ge=0, lt=1)  # 1: no gradient is ever forgotten
    weight_decay: float = rule(ge=0)
    label_smoothing: float = rule(ge=0, lt=1)  # 1: every target uniform, nothing to learn
    warmup_fraction: float = rule(ge=0, le=1)
    warmup_from: float = rule(ge=0, le=1)
    decay_to: float = rule(ge=0, le=1)
    bn_bias_lr_mult: float = rule(gt=0)
    bn_bias_decay: bool = rule()
    lookahead: bool = rule()
    flip: Literal[FLIP_MODES] = rule()
    translate: int = rule(ge=0, le=8)


class Pretrain(Optim):
    epochs: int = rule(ge=0)  # 0 exports published weights (model.weights) without source training
    freeze_depth: int = rule(ge=0, le=1)
    tta: Literal[TTA_MODES] = rule()


class Transfer(Optim):
    freeze_depth: int = rule(ge=0)
    backbone_lr_mult: float = rule(ge=0)
    unfreeze_every_epochs: int = rule(ge=0)


class Scratch(Optim):
    freeze_depth: int = rule(ge=0, le=1)


class Probe(Optim):
    depth: Optional[int] = rule(ge=1)


class Distill(Optim):
    student: Model = rule()
    student_init: Optional[str] = rule(min_length=1)  # a model.pt to start the student from
    method: str = rule()  # a name of the distill.losses registry (checks.py)
    temperature: float = rule(gt=0)
    alpha: float = rule(ge=0, le=1)
    dkd_alpha: float = rule(ge=0)
    dkd_beta: float = rule(ge=0)
    dkd_warmup: int = rule(ge=0)
    mixup: float = rule(ge=0)


class Prune(Optim):
    criterion: str = rule()  # a name of the prune.structured importance registry (checks.py)
    mode: Literal["structured", "unstructured"] = rule()
    target: Literal["macs", "channels"] = rule()
    scope: Literal[tuple(SCOPES)] = rule()
    teacher: Literal["transfer", "student"] = rule()
    ratio: float = rule(gt=0, lt=1)  # the share of MACs, channels or weights removed
    rates: list[Annotated[float, Field(ge=0)]] = rule()  # one per block of the model (or [])
    keep: Names = rule()
    steps: int = rule(ge=1)
    round_to: Optional[int] = rule(ge=1)
    sparse_epochs: int = rule(ge=0)
    sparse_reg: float = rule(ge=0)


class Split(Schema):  # data.source / data.target
    dataset: str = rule(min_length=1)  # cifar10, cifar100, synthetic or a path
    classes: Names = rule(min_length=1)
    train_per_class: Optional[int] = rule(ge=1)
    val_per_class: int = rule(ge=0)
    test_per_class: Optional[int] = rule(ge=1)


class Synthetic(Schema):
    train_per_class: int = rule(ge=1)
    test_per_class: int = rule(ge=1)


class Data(Schema):
    download: bool = rule()
    verify_checksums: bool = rule()
    image_size: int = rule(ge=1)
    source: Split = rule()
    target: Split = rule()
    synthetic: Synthetic = rule()


class Trainer(Schema):
    accelerator: Literal[ACCELERATORS] = rule()
    strategy: str = rule()  # a name Lightning registers (checks.py)
    devices: int | str | list[int] = rule()  # a count, "auto" or device ids (checks.py)
    num_nodes: int = rule(ge=1)
    num_threads: Optional[int] = rule(ge=1)
    precision: Literal[PRECISIONS] = rule()
    checkpoint_budget: float = rule(ge=0, le=1)
    deterministic: Optional[bool | Literal["warn"]] = rule()  # Lightning ignores any other value: determinism off
    benchmark: Optional[bool] = rule()
    sync_batchnorm: bool = rule()
    progress_bar: bool = rule()
    loggers: Optional[list[Literal[LOGGERS]]] = rule()  # null or []: none


class Quantize(Schema):
    calibration_images: int = rule(ge=1)
    method: Literal[QUANTIZE_METHODS] = rule()
    format: Literal[QUANTIZE_FORMATS] = rule()
    per_channel: bool = rule()
    reduce_range: bool = rule()
    max_drop: float = rule(ge=0, le=1)
    qat_epochs: int = rule(ge=0)
    qat_lr: float = rule(gt=0)
    keep_float: Names = rule()


class Evaluate(Schema):
    tta: Literal[TTA_MODES] = rule()
    latency_repeats: int = rule(ge=1)
    throughput_batch: int = rule(ge=1)
    throughput_repeats: int = rule(ge=1)
    batch_size: int = rule(ge=1)


class FreezeCurve(Schema):
    depths: list[Annotated[int, Field(ge=0)]] = rule()  # block counts, e.g. [0, 2, 3, 4] (or [])


class Paths(Schema):
    data_dir: str = Field(min_length=1)
    artifacts_dir: str = Field(min_length=1)


BLOCKS = {"model": Model, "pretrain": Pretrain, "transfer": Transfer, "probe": Probe, "scratch": Scratch,
          "distill": Distill, "student": Optim, "prune": Prune, "quantize": Quantize, "trainer": Trainer,
          "evaluate": Evaluate, "freeze_curve": FreezeCurve, "data": Data}
Config = create_model("Config", __base__=Schema, seed=(int, Field(ge=0, lt=2**32)), name=(str, Field(min_length=1)),
                      paths=(Paths, ...), **{name: (schema, rule()) for name, schema in BLOCKS.items()})


def fail(key: str, value, need: str):
    raise TransferkitError(f"{key}={value!r} is invalid: {need}. {SETTING_FIX.format(key=key)} "
                           f"(for dvc repro: `transferkit params {key}=VALUE` with the other overrides you use).")


def _where(loc: tuple) -> tuple[list[str], int | None]:
    """The config keys of an error's location, and the list item it is about: the schema's own fields only,
    as pydantic adds the type a union tried (bool, literal['warn']) after them."""
    keys, item, schema = [], None, Config
    for k in loc:
        if isinstance(k, int) and item is None:
            item = k
        elif schema is not None and item is None and k in schema.model_fields:
            keys.append(k)
            inner = schema.model_fields[k].annotation
            schema = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return keys, item


def check_schema(params: dict) -> None:
    """The first value that breaks the schema, as one error naming its key (a list by its item); a key
    that allows several types (bool or "warn") fails once per type: their needs joined by "or"."""
    try:
        Config.model_validate(params)
    except ValidationError as e:
        errors = e.errors()
        if errors[0]["type"] == "extra_forbidden":  # a key Hydra composed: set in a file of conf/, or by +key=value
            key = ".".join(map(str, errors[0]["loc"]))
            close = " or ".join(difflib.get_close_matches(key, [k for k in flatten(params) if k != key], n=3))
            raise TransferkitError(f"no stage reads {key}{f' (did you mean {close}?)' if close else ''}: a file in "
                                   f"conf/ (`grep -rn '{key.rsplit('.', 1)[-1]}:' conf/`), an override +{key}=... or "
                                   f"a params file sets it. Fix: rename it, or remove it.") from None
        keys, item = _where(errors[0]["loc"])
        if errors[0]["type"] == "missing":
            raise TransferkitError(f"{'.'.join(keys)} is missing: every stage reads it. Fix: leave it in conf/ (no "
                                   f"~{'.'.join(keys)}), or set it with {'.'.join(keys)}=VALUE.") from None
        value = params
        for k in keys:
            value = value[k]
        need = " or ".join(dict.fromkeys(err["msg"].replace("Input should be", "must be") for err in errors
                                         if _where(err["loc"]) == (keys, item)))
        need += f" (item {item}: {errors[0]['input']!r})" if item is not None else ""
        if keys == ["trainer", "precision"] and (full := LIGHTNING_SHORT.get(str(value))):
            need += f" (Lightning's short name {value} is {full})"
        if errors[0]["type"] == "string_type" and errors[0]["input"] is not None:  # classes=[0,1]: folder names
            need += "; YAML reads an unquoted number or true as no text, so quote it, as in ['0','1']"
        fail(".".join(keys), value, need)
