"""A fast CNN for 32x32 images in the style of airbench (Keller Jordan's CIFAR-10 speed
records): a tiny 2x2 stem, then three groups of conv-pool-conv with BatchNorm and GELU,
global max pooling. Few layers at high width run well on CPUs with bf16 and channels_last."""

from __future__ import annotations

from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.GELU())


def conv_group(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv_bn(c_in, c_out), nn.MaxPool2d(2), conv_bn(c_out, c_out))


def fastnet_blocks(widths: list[int], stem_width: int = 24) -> list[nn.Module]:
    """Blocks: [stem, group1, group2, group3]."""
    stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, padding=0, bias=True), nn.GELU())
    blocks, c_in = [stem], stem_width
    for w in widths:
        blocks.append(conv_group(c_in, w))
        c_in = w
    return blocks
