"""BatchNorm folded into the convolution (or linear layer) before it: the deployed graph has one op
where training needed two, in fp32 as in INT8. Max pooling between the two is no obstacle when every BatchNorm
scale is positive, since pooling then commutes with the per-channel affine map (fastnet pools
between its convolution and BatchNorm). A ReLU after the pooling then moves before it (max
pooling commutes with any non-decreasing function), so that runtimes fuse it into the
convolution: ONNX Runtime's INT8 operators do, and mishandle Conv -> MaxPool -> Relu.
The input scaling folds into the first convolution too, where that convolution pads nothing, and a
head's logit scale (fastnet's 1/9) into the classifier, so that the graph ends in the classifier's
own op: `quantize.keep_float=[Gemm]` then leaves the logits in float (a Mul after it would be quantized).
Last, the first convolution's input gains zero channels up to a multiple of 4 (weights zero too,
so the output is the same): ONNX Runtime's INT8 convolution runs a 3-channel input on a slow path
(bench/int8.py measures both, docs/deploy.md says by how much)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _scale(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> torch.Tensor:
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _fold(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d, scale: torch.Tensor) -> None:
    shift = bn.bias - bn.running_mean * scale
    conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.dim() - 1)))
    conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift)


# torchvision's ResNet blocks hold their pairs as attributes (convK feeds bnK), not in a Sequential
RESNET_BLOCKS = ("torchvision.models.resnet.BasicBlock", "torchvision.models.resnet.Bottleneck")


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with every Conv2d -> [MaxPool2d] -> BatchNorm2d and Linear -> BatchNorm1d
    folded (the exporters fold a Linear's BatchNorm themselves: the file's layer would match none of the model's)."""
    model = copy.deepcopy(model).eval()
    for seq in model.modules():
        if f"{type(seq).__module__}.{type(seq).__name__}" in RESNET_BLOCKS:
            for k in (1, 2, 3):
                if isinstance(bn := getattr(seq, f"bn{k}", None), nn.BatchNorm2d):
                    _fold(getattr(seq, f"conv{k}"), bn, _scale(bn))
                    setattr(seq, f"bn{k}", nn.Identity())
        if not isinstance(seq, nn.Sequential):
            continue
        for i, conv in enumerate(list(seq)):
            if isinstance(conv, nn.Linear) and i + 1 < len(seq) and isinstance(bn := seq[i + 1], nn.BatchNorm1d):
                _fold(conv, bn, _scale(bn))
                seq[i + 1] = nn.Identity()
                continue
            j = i + 1 + (i + 1 < len(seq) and isinstance(seq[i + 1], nn.MaxPool2d))
            if not isinstance(conv, nn.Conv2d) or j >= len(seq) or not isinstance(seq[j], nn.BatchNorm2d):
                continue
            bn = seq[j]
            scale = _scale(bn)
            if j > i + 1 and not bool((scale > 0).all()):
                continue  # a negative scale would turn the max into a min
            _fold(conv, bn, scale)
            seq[j] = nn.Identity()
            if j > i + 1 and j + 1 < len(seq) and isinstance(seq[j + 1], nn.ReLU):
                seq[i + 1], seq[i + 2], seq[j + 1] = seq[j + 1], seq[i + 1], nn.Identity()
    return model


def _first_slot(model: nn.Module) -> tuple[nn.Sequential | None, nn.Conv2d | None]:
    """The innermost Sequential that starts blocks[0], and the convolution at its start (the one the
    images meet first) if that is an ungrouped one."""
    seq = getattr(model, "blocks", [None])[0]
    while isinstance(seq, nn.Sequential) and len(seq) and isinstance(seq[0], nn.Sequential):
        seq = seq[0]
    if not (isinstance(seq, nn.Sequential) and len(seq)):
        return None, None
    conv = seq[0]
    return seq, conv if isinstance(conv, nn.Conv2d) and conv.groups == 1 else None


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return _first_slot(model)[1]


@torch.no_grad()
def fold_input_scaling(model: nn.Module) -> nn.Module:
    """`model` (a copy from fold_batchnorm) with its input scaling, (x - mean) / std, folded into
    the first convolution when that is the first thing the scaled images meet and it pads nothing
    (zero padding after scaling is not zero padding before it); otherwise `model` as it is."""
    conv = first_conv(model)
    if not (conv is not None and hasattr(model, "normalize") and all(p == 0 for p in conv.padding)):
        return model
    mean, std = model.normalize.mean, model.normalize.std
    conv.weight.div_(std.view(1, -1, 1, 1))
    shift = (conv.weight * mean.view(1, -1, 1, 1)).sum((1, 2, 3))
    conv.bias = nn.Parameter(-shift if conv.bias is None else conv.bias - shift)
    model.normalize = nn.Identity()
    return model


class ChannelPaddedConv2d(nn.Conv2d):
    """A convolution whose input gains `extra` zero channels first (an ONNX Pad before the Conv)."""

    extra: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 0, 0, 0, 0, self.extra)))


@torch.no_grad()
def pad_input_channels(model: nn.Module, multiple: int = 4) -> nn.Module:
    """`model` (a copy) with its first convolution taking its input padded with zero channels up to
    a multiple of `multiple`, those channels' weights zero: the same output."""
    seq, conv = _first_slot(model)
    if conv is None or conv.in_channels % multiple == 0 or isinstance(conv, ChannelPaddedConv2d):
        return model
    extra = -conv.in_channels % multiple
    wide = ChannelPaddedConv2d(conv.in_channels + extra, conv.out_channels, conv.kernel_size, stride=conv.stride,
                               padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                               padding_mode=conv.padding_mode).to(conv.weight)
    wide.extra = extra
    wide.weight.zero_()[:, :conv.in_channels] = conv.weight
    if conv.bias is not None:
        wide.bias.copy_(conv.bias)
    seq[0] = wide
    return model


@torch.no_grad()
def fold_head_scale(model: nn.Module) -> nn.Module:
    """`model` (a copy) with its head's logit scale folded into the classifier's weights and bias."""
    head = getattr(model, "head", None)
    if getattr(head, "scale", 1.0) != 1.0:
        head.fc.weight.mul_(head.scale)
        if head.fc.bias is not None:
            head.fc.bias.mul_(head.scale)
        head.scale = 1.0
    return model


def deployable(model: nn.Module, for_training: bool = False) -> nn.Module:
    """The model as export writes it: a copy with BatchNorm, the input scaling and the logit scale folded and the
    input channels padded to 4. For INT8 fine-tuning (`for_training`), the logit scale stays a scale until its
    export: folded into the weights, it would make the classifier learn 1/scale^2 times as fast."""
    model = pad_input_channels(fold_input_scaling(fold_batchnorm(model)))
    return model if for_training else fold_head_scale(model)
