"""Model zoo: architectures by name, each built as a BlockNet (blocks + head)."""

from __future__ import annotations

from pathlib import Path

import torch

from transferkit.errors import TransferkitError
from transferkit.models.blocknet import BlockNet
from transferkit.models.fastnet import fastnet_blocks, whiten_stem
from transferkit.models.mobilenet import mobilenet_blocks
from transferkit.models.resnet import resnet18_blocks, resnet18_normalisation
from transferkit.models.vgg import vgg_mini_blocks

# name -> (blocks builder, head pooling, head bias, logit scale)
ARCHITECTURES = {
    "fastnet": (fastnet_blocks, "max", False, 1 / 9),
    "vgg_mini": (vgg_mini_blocks, "avg", True, 1.0),
    "resnet18": (resnet18_blocks, "avg", True, 1.0),
    "mobilenet": (mobilenet_blocks, "avg", True, 1.0),
}

# name -> the input normalisation of its published weights (model.weights), by their name
PUBLISHED_NORMALISATION = {"resnet18": resnet18_normalisation}
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]


def build_model(name: str, num_classes: int, *, mean=None, std=None,
                depth: int | None = None, fetch_weights: bool = True, key: str = "model", **kwargs) -> BlockNet:
    """`key`: the config key the settings come from (model, distill.student), for error messages; `mean`, `std`:
    the input normalisation (default: CIFAR's, or the one published weights were trained with)."""
    if name not in ARCHITECTURES:
        raise TransferkitError(f"unknown {key}.name '{name}'. Fix: use one of {sorted(ARCHITECTURES)}.")
    builder, pool, bias, scale = ARCHITECTURES[name]
    try:
        extra = {} if fetch_weights or not kwargs.get("weights") else {"load_weights": False}
        blocks = builder(**kwargs, **extra)
    except TypeError as e:
        group = "model" if key == "model" else f"model@{key}"  # a changed name keeps the other model's keys
        raise TransferkitError(f"bad settings for {key} (model '{name}'): {e}. Fix: give {key} only the keys "
                               f"that conf/model/{name}.yaml sets (to change the architecture, choose it whole: "
                               f"{group}={name}).") from e
    if mean is None or std is None:
        weights = kwargs.get("weights")
        mean, std = PUBLISHED_NORMALISATION[name](weights) if weights else (CIFAR_MEAN, CIFAR_STD)
    arch = {"name": name, "mean": list(mean), "std": list(std), **kwargs}
    try:
        model = BlockNet(blocks, num_classes, mean=mean, std=std, arch=arch, pool=pool, head_bias=bias,
                         head_scale=scale)
    except RuntimeError as e:  # its dry run through the blocks: settings that leave nothing of a 32x32 image
        raise TransferkitError(f"{key} (model '{name}', {kwargs}) does not fit 32x32 images: "
                               f"{' '.join(str(e).split())}. Fix: give it fewer downsampling stages (fewer widths), "
                               f"as conf/model/{name}.yaml does.") from e
    if depth is not None:
        model.truncate(depth, num_classes)
    return model


DATA_INITIALISED = frozenset({"fastnet"})  # the architectures whose first block init_from_data sets


@torch.no_grad()
def init_from_data(model: BlockNet, images: torch.Tensor, max_images: int = 5000) -> bool:
    """Data-dependent initialisation for models trained from random init (fastnet's whitening
    stem); a no-op for other architectures. `images`: uint8 [N, 3, H, W]. Returns whether it
    initialised anything (the first block, which freeze_depth=1 may then keep fixed)."""
    if model.arch["name"] not in DATA_INITIALISED:
        return False
    # a strided subset: prepared tasks are sorted by class, so the first N would be one class;
    # the stride rounds up, so that the subset reaches the last image's class
    subset = images[:: max(1, -(-len(images) // max_images))]
    whiten_stem(model.blocks[0][0], model.normalize(subset.float() / 255))
    return True


def model_from_config(model_cfg: dict, num_classes: int, **options) -> BlockNet:
    """`options`: build_model's own (key, fetch_weights, depth)."""
    cfg = dict(model_cfg)
    return build_model(cfg.pop("name"), num_classes, **cfg, **options)


def builder_defaults(name: str) -> dict:
    """The settings an architecture takes when its config leaves them out (its builder's defaults)."""
    import inspect

    params = inspect.signature(ARCHITECTURES[name][0]).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def save_checkpoint(model: BlockNet, path: str | Path, classes: list[str], **extra) -> None:
    """A self-describing checkpoint: enough to rebuild the model without any config."""
    from transferkit.io import save_torch

    from transferkit.models.serialize import layer_shapes

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # pruned models: record every layer's channel counts so loading needs no pruning plan
    shapes = layer_shapes(model) if model.arch.get("pruned") else None
    save_torch({"arch": model.arch, "classes": list(classes), "state_dict": state,
                "layer_shapes": shapes, **extra}, path)


def load_checkpoint(path: str | Path, produced_by: str, classes: list[str] | None = None,
                    what: str = "model", remake: str | None = None) -> tuple[BlockNet, dict]:
    """A model.pt a stage wrote, rebuilt; with `classes`, it must classify exactly those. `remake`
    says how to write a readable one where the user names the file (default: rerun `produced_by`)."""
    from transferkit.io import load_torch

    ckpt = load_torch(path, "model checkpoint", produced_by, remake)
    if problem := _not_a_checkpoint(ckpt):
        raise TransferkitError(f"{path} is not a transferkit checkpoint ({problem}). "
                               f"Fix: point at a model.pt written by a transferkit stage.")
    if classes is not None and list(ckpt["classes"]) != list(classes):
        raise TransferkitError(
            f"{what} {path} was trained on classes {list(ckpt['classes'])}, but the target task is {list(classes)}. "
            f"Fix: rerun '{produced_by}' on this task (`dvc repro {produced_by}`).")
    try:
        # sizes first: a tensor whose values the file does not hold (one value strided over 20000x20000), or a
        # doctored arch (widths of 4096), would allocate gigabytes before any shape is compared
        size, state, names = Path(path).stat().st_size, ckpt["state_dict"], ckpt["classes"]
        if big := next((k for k, v in state.items() if v.numel() * v.element_size() > size), None):
            raise ValueError(f"its tensor {big} has {state[big].numel():,} values, more than the file holds")
        # views of one storage are saved once but loaded (a pruned model's layers made) once each
        if (total := sum(v.numel() * v.element_size() for v in state.values())) > size:
            raise ValueError(f"its tensors add up to {total / 1e6:,.1f} MB, more than the file's {size / 1e6:,.1f} MB")
        # the head is built with a row per class name, before its weights are compared
        if (head := state.get("head.fc.weight")) is not None and head.shape[:1] != (len(names),):
            raise ValueError(f"its head has {head.shape[0] if head.dim() else 'no'} outputs for {len(names):,} classes")
        # pruned: the original is built, then cut
        if (planned := _weight_bytes(ckpt["arch"], len(names))) > max(64 * size, 2**30):
            raise ValueError(f"its architecture has {planned / 1e6:,.0f} MB of weights, the file {size / 1e6:,.1f} MB")
        model = _rebuild(ckpt)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, ArithmeticError, TransferkitError) as e:
        # torch's message spans lines and names every key that differs; the error is one line
        why = " ".join(str(e).split(" Fix: ")[0].split())
        why = why if len(why) <= 400 else f"{why[:400]} ..."
        fix = remake or f"write it again (`dvc repro {produced_by}`)"
        raise TransferkitError(f"{path} does not fit its own architecture {ckpt['arch']} ({why}): it was altered "
                               f"after a stage wrote it. Fix: {fix}.") from e
    return model, ckpt


def _weight_bytes(arch: dict, num_classes: int) -> int:
    """The bytes of the weights `arch` builds with a head of `num_classes` (a truncated model's blocks are all built
    first, then a second head), counted on the meta device (no memory)."""
    settings = {k: v for k, v in arch.items() if k not in ("name", "pruned", "depth")}
    with torch.device("meta"):
        model = build_model(arch["name"], num_classes, fetch_weights=False, **settings)
        depth = arch.get("depth")
        probe = (model.feature_dim(depth) + 1) * num_classes * 4 if depth is not None else 0
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) + probe


def _rebuild(ckpt: dict) -> BlockNet:
    """The checkpoint's model: its architecture built (pruned ones shrunk to their saved channel counts), then its
    weights loaded; published weights are never fetched again, since the state_dict overwrites every tensor."""
    arch = dict(ckpt["arch"])
    pruned = arch.pop("pruned", False)
    model = build_model(arch.pop("name"), len(ckpt["classes"]), fetch_weights=False, **arch)
    if pruned:
        from transferkit.models.serialize import shrink_to

        shrink_to(model, ckpt["layer_shapes"], ckpt["state_dict"])
        model.arch["pruned"] = True
        # each tensor fits its own layer's recorded sizes; whether the layers fit each other shows in a forward
        was_training = model.training
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, model.input_size, model.input_size))
        model.train(was_training)
    else:
        model.load_state_dict(ckpt["state_dict"])
    return model


def _not_a_checkpoint(ckpt) -> str | None:
    """What a file read as plain data lacks of a checkpoint save_checkpoint writes, or None."""
    if not isinstance(ckpt, dict) or not {"arch", "state_dict", "classes"} <= ckpt.keys():
        return "no 'arch'/'state_dict'/'classes'"
    arch, state, classes = ckpt["arch"], ckpt["state_dict"], ckpt["classes"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or len(arch) > 32 or not all(
            isinstance(k, str) and len(k) <= 64 for k in arch):
        return "its 'arch' is no settings with a 'name'"
    # pickle's memo lets a small file hold a list of a billion lists, which a message or an export would walk
    if bad := next((k for k, v in arch.items() if not all(map(_plain_setting, v if type(v) in (list, tuple)
                                                                  and len(v) <= 64 else [v]))), None):
        return f"its 'arch' setting {bad!r} is no number, name or short flat list"
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes) \
            or len(set(classes)) != len(classes) or len(classes) < 2:  # as prepare's: two or more, each once
        return "its 'classes' are no list of two or more distinct names"
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return "its 'state_dict' is no tensors by name"
    shapes = ckpt.get("layer_shapes")
    if arch.get("pruned") and not (isinstance(shapes, dict) and all(
            isinstance(a, dict) and all(type(v) is int and v > 0 for v in a.values()) for a in shapes.values())):
        return "a pruned model's 'layer_shapes' are no channel counts by layer"
    return None


def _plain_setting(value) -> bool:
    """A number or a short name: what a config sets (an int short enough to print)."""
    return type(value) in (bool, float, type(None)) or (type(value) is int and abs(value) < 2**63) or (
        type(value) is str and len(value) <= 100)


def load_backbone(path: str | Path, model_cfg: dict, num_classes: int, produced_by: str, key: str = "model",
                  remake: str | None = None) -> BlockNet:
    """Load pretrained blocks into the architecture `model_cfg` (the config key `key`), with a fresh head;
    `remake` says how to write a checkpoint of that architecture (default: rerun `produced_by`)."""
    model, ckpt = load_checkpoint(path, produced_by, remake=remake)
    wanted = {k: v for k, v in dict(model_cfg).items() if k != "weights"}
    # a setting the checkpoint does not record is the one its builder used: its default
    made = {**builder_defaults(ckpt["arch"]["name"]), **ckpt["arch"]}
    # a pruned model's arch records the widths it had before the cut: its layers are narrower than they say
    # the settings that differ, not both architectures whole (a line of hundreds of characters)
    other = [f"{k} {made.get(k)!r}, not {v!r}" for k, v in wanted.items() if made.get(k) != v]
    other += ["its layers pruned"] * bool(ckpt["arch"].get("pruned"))
    other += [] if ckpt["arch"].get("depth") is None else [f"cut to depth {ckpt['arch']['depth']}"]
    if other:
        raise TransferkitError(
            f"checkpoint {path} holds a {made.get('name')} of another architecture than {key} asks for "
            f"({'; '.join(other)}). "
            f"Fix: {remake or f'rerun {produced_by!r} with this model config (`dvc repro {produced_by}`)'} or set "
            f"{key} to match the checkpoint.")
    model.new_head(num_classes)
    return model
