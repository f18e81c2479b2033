"""Save and load pruned models without the pruning plan.

A checkpoint of a pruned model records, besides the weights, the channel counts of every
layer (`layer_shapes`). Loading builds the original architecture, shrinks each layer to
the recorded size and loads the weights: a user needs neither Torch-Pruning nor the plan.
"""

from __future__ import annotations

import torch
from torch import nn

SHAPE_ATTRS = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm1d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
}


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    shapes = {}
    for name, m in model.named_modules():
        # any BatchNorm: a DDP fit under sync_batchnorm gives them back as Lightning's _BatchNormXd
        if attrs := ("num_features",) if isinstance(m, nn.modules.batchnorm._BatchNorm) else SHAPE_ATTRS.get(type(m)):
            shapes[name] = {a: int(getattr(m, a)) for a in attrs}
    return shapes


def _implied_shape(module: nn.Module, attr: str, current: torch.Tensor) -> tuple[int, ...]:
    """The shape of `module`'s tensor `attr` once its sizes are set; that of `current` for a module without any."""
    if isinstance(module, nn.Conv2d):
        out = module.out_channels
        return {"weight": (out, module.in_channels // module.groups, *module.kernel_size)}.get(attr, (out,))
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features)}.get(attr, (module.out_features,))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return () if attr == "num_batches_tracked" else (module.num_features,)
    return tuple(current.shape)


@torch.no_grad()
def shrink_to(model: nn.Module, shapes: dict[str, dict[str, int]], state_dict: dict) -> nn.Module:
    """Resize layers of a freshly built model to the recorded shapes, then load weights."""
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        for attr, value in attrs.items():
            if attr not in SHAPE_ATTRS.get(type(modules[name]), ()):  # a file sets sizes, nothing else
                raise KeyError(f"{name}.{attr} is no channel count")
            setattr(modules[name], attr, value)
    for key, tensor in state_dict.items():
        module_name, _, attr = key.rpartition(".")
        module = modules[module_name]
        current = getattr(module, attr)
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            # a tensor takes the shape its layer's recorded sizes give it, never one of the file's choosing
            if (implied := _implied_shape(module, attr, current)) != tuple(tensor.shape):
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, its layer_shapes say {implied}")
            if isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(torch.empty_like(tensor), current.requires_grad))
            else:
                module._buffers[attr] = torch.empty_like(tensor)
    model.load_state_dict(state_dict)
    return model
