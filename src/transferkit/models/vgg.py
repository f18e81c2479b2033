"""The source material's mini-VGG with BatchNorm: 9 conv layers (3x3, three stages of three
with max pooling) and 3 affine layers. Each conv layer is its own block, so
`freeze_depth=6` is exactly the source material's "conv1-6 frozen"."""

from __future__ import annotations

from torch import nn


def vgg_mini_blocks(widths: list[int], fc_width: int) -> list[nn.Module]:
    """Blocks: conv1..conv9 (pooling after conv3, conv6, conv9), then fc1, fc2; the head is fc3."""
    blocks, c_in = [], 3
    for i, w in enumerate(widths):
        layers = [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        if i % 3 == 2:
            layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
        c_in = w
    side = 32 // 2 ** (len(widths) // 3)  # images are 32x32 (data.image_size)
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, fc_width, bias=False),
                                nn.BatchNorm1d(fc_width), nn.ReLU(inplace=True), nn.Dropout(0.3)))
    blocks.append(nn.Sequential(nn.Linear(fc_width, fc_width, bias=False), nn.BatchNorm1d(fc_width),
                                nn.ReLU(inplace=True), nn.Dropout(0.3)))
    return blocks
