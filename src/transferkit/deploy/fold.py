"""BatchNorm folded into the convolution before it: the deployed graph has one op where training
needed two, in fp32 as in INT8. Max pooling between the two is no obstacle when every BatchNorm
scale is positive, since pooling then commutes with the per-channel affine map (fastnet pools
between its convolution and BatchNorm). A ReLU after the pooling then moves before it (max
pooling commutes with any non-decreasing function), so that runtimes fuse it into the
convolution: ONNX Runtime's INT8 operators do, and mishandle Conv -> MaxPool -> Relu.
The input scaling folds into the first convolution too, where that convolution pads nothing."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with every Conv2d -> [MaxPool2d] -> BatchNorm2d folded."""
    model = copy.deepcopy(model).eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i, conv in enumerate(list(seq)):
            j = i + 1 + (i + 1 < len(seq) and isinstance(seq[i + 1], nn.MaxPool2d))
            if not isinstance(conv, nn.Conv2d) or j >= len(seq) or not isinstance(seq[j], nn.BatchNorm2d):
                continue
            bn = seq[j]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            if j > i + 1 and not bool((scale > 0).all()):
                continue  # a negative scale would turn the max into a min
            shift = bn.bias - bn.running_mean * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift)
            seq[j] = nn.Identity()
            if j > i + 1 and j + 1 < len(seq) and isinstance(seq[j + 1], nn.ReLU):
                seq[i + 1], seq[i + 2], seq[j + 1] = seq[j + 1], seq[i + 1], nn.Identity()
    return model


@torch.no_grad()
def fold_input_scaling(model: nn.Module) -> nn.Module:
    """`model` (a copy from fold_batchnorm) with its input scaling, (x - mean) / std, folded into
    the first convolution when that is the first thing the scaled images meet and it pads nothing
    (zero padding after scaling is not zero padding before it); otherwise `model` as it is."""
    first = getattr(model, "blocks", [None])[0]
    conv = first[0] if isinstance(first, nn.Sequential) and len(first) else None
    if not (isinstance(conv, nn.Conv2d) and hasattr(model, "normalize") and conv.groups == 1
            and all(p == 0 for p in conv.padding)):
        return model
    mean, std = model.normalize.mean, model.normalize.std
    conv.weight.div_(std.view(1, -1, 1, 1))
    shift = (conv.weight * mean.view(1, -1, 1, 1)).sum((1, 2, 3))
    conv.bias = nn.Parameter(-shift if conv.bias is None else conv.bias - shift)
    model.normalize = nn.Identity()
    return model


def deployable(model: nn.Module) -> nn.Module:
    """The model as export writes it and INT8 fine-tuning trains it: a copy with BatchNorm and the
    input scaling folded."""
    return fold_input_scaling(fold_batchnorm(model))
