"""A fast CNN for 32x32 images in the style of airbench (Keller Jordan's CIFAR-10 speed
records): a 2x2 stem initialised to whiten image patches, then three groups of
conv-pool-conv with BatchNorm and GELU, global max pooling, and a scaled linear head.
Few layers at high width: few, large kernels, which suit GPUs and CPUs alike."""

from __future__ import annotations

import torch
from torch import nn


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
# whiten_stem sets the stem to +/- each eigenvector of the 2x2x3 pixel patches: 2 x 12 filters at most
MAX_STEM_WIDTH = 2 * 2 * 2 * 3


def conv_bn(c_in: int, c_out: int, bn_momentum: float, pool: bool = False, dirac_init: bool = False,
            activation: str = "gelu") -> nn.Sequential:
    # pooling before BatchNorm/activation: same result as after, on 4x fewer values
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    if dirac_init:  # airbench: the first c_in filters start as the identity, so signals pass at first
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    layers = [conv]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out, momentum=bn_momentum), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


def conv_group(c_in: int, c_out: int, bn_momentum: float, dirac_init: bool = False,
               activation: str = "gelu") -> nn.Sequential:
    return nn.Sequential(conv_bn(c_in, c_out, bn_momentum, pool=True, dirac_init=dirac_init, activation=activation),
                         conv_bn(c_out, c_out, bn_momentum, dirac_init=dirac_init, activation=activation))


def fastnet_blocks(widths: list[int], stem_width: int = 24, bn_momentum: float = 0.2,
                   dirac_init: bool = False, activation: str = "gelu") -> list[nn.Module]:
    """Blocks: [stem, group1, group2, group3]. `activation`: gelu (airbench's choice) or relu,
    which INT8 kernels fuse into the convolution (deploy/quantize.py)."""
    if activation not in ACTIVATIONS:
        from transferkit.errors import TransferkitError

        raise TransferkitError(f"unknown model activation '{activation}'. Fix: use one of {sorted(ACTIVATIONS)}.")
    stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, padding=0, bias=True), ACTIVATIONS[activation]())
    blocks, c_in = [stem], stem_width
    for w in widths:
        blocks.append(conv_group(c_in, w, bn_momentum, dirac_init, activation))
        c_in = w
    return blocks


@torch.no_grad()
def whiten_stem(stem_conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the 2x2 stem filters to the eigenvectors of the patch covariance of `images`
    (normalised), scaled to unit variance, then their negatives: the first `stem_width` of those
    24 (+/- pairs only at 24). A data-dependent init from airbench that lets the first layer start
    out decorrelating pixels."""
    c, h, w = stem_conv.weight.shape[1:]
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w).float()
    cov = patches.T @ patches / len(patches)
    eigval, eigvec = torch.linalg.eigh(cov)
    filters = (eigvec.T / torch.sqrt(eigval.view(-1, 1) + eps)).reshape(-1, c, h, w).flip(0)
    n = stem_conv.weight.shape[0]
    stem_conv.weight.copy_(torch.cat([filters, -filters])[:n])
    if stem_conv.bias is not None:  # centred patches: no offset to start from
        stem_conv.bias.zero_()
