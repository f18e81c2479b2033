"""torchvision's MobileNetV2 (depthwise-separable inverted residuals) adapted to 32x32:
stride 1 in the stem and the first downsampling stage, so 32x32 inputs end at 4x4 like the
other models here. `width_mult` scales every layer (0.5 = half the channels)."""

from __future__ import annotations

from torch import nn


def mobilenet_blocks(width_mult: float = 0.5) -> list[nn.Module]:
    """Blocks by resolution stage: [stem+first, 16x16 stage, 8x8 stage, 4x4 stage, last 1x1 conv]."""
    from torchvision.models import mobilenet_v2  # here: importing torchvision takes seconds (torch._dynamo)

    f = mobilenet_v2(weights=None, width_mult=width_mult).features
    f[0][0].stride = (1, 1)          # stem: 32x32 stays 32x32
    f[2].conv[1][0].stride = (1, 1)  # first stride-2 stage: stays at 32x32
    # remaining stride-2 stages: f[4] (->16), f[7] (->8), f[14] (->4)
    return [nn.Sequential(*f[0:4]), nn.Sequential(*f[4:7]), nn.Sequential(*f[7:14]),
            nn.Sequential(*f[14:18]), f[18]]
