"""Batched augmentation on tensors, on whatever device the batch is on.

Per-image PIL transforms in DataLoader workers are the usual path and the slow one (see
bench/). Here a whole uint8 batch is flipped and translated with a few tensor ops.
Hand-written because torchvision.transforms.v2 draws one set of random parameters per
call (the whole batch moves together) and kornia's per-sample crops resample bilinearly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to `pad` pixels in x and y (reflect padding, then crop)."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), device=x.device, generator=gen)
    out = torch.empty_like(x)
    # one slice per distinct shift: (2*pad+1)^2 groups, each a plain strided copy
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if sel.any():
                out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def augment_batch(x: torch.Tensor, flip: bool, translate: int) -> torch.Tensor:
    """x: float [N, C, H, W] in [0, 1]. Uses the global RNG, which Lightning seeds."""
    if flip:
        x = random_flip(x)
    return random_translate(x, translate)
