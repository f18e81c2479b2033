"""Batched augmentation on tensors, on whatever device the batch is on.

Each op takes its random draws as tensors and uses them only as data (a mask, gather indices),
never in Python control flow: nothing here waits for the device (`torch.compile(fullgraph=True)`
compiles it, which tests check). Hand-written because torchvision.transforms.v2 draws one set of
random parameters per call (the whole batch moves together) and kornia's per-sample crops
resample bilinearly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLIP_MODES = ("random", "alternating", "none")


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose entry of the bool `mask` [N] is set."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def translate(x: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift image i by shifts[i] - pad pixels (rows, columns), reflect-padding the border.
    shifts: int64 [N, 2] in 0..2*pad. Two gathers: no per-shift groups, no boolean indexing."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = torch.arange(h, device=x.device) + shifts[:, :1]            # [N, H]
    cols = torch.arange(w, device=x.device) + shifts[:, 1:]            # [N, W]
    x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def draw_flips(n: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) < 0.5


def draw_shifts(n: int, pad: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, 2 * pad + 1, (n, 2), device=device, generator=gen)


def augment(x: torch.Tensor, flip_mask: torch.Tensor | None, shifts: torch.Tensor | None, pad: int) -> torch.Tensor:
    """x: float [N, C, H, W]; flip_mask / shifts: the draws above (None = that op is off)."""
    if flip_mask is not None:
        x = flip(x, flip_mask)
    if shifts is not None and pad > 0:
        x = translate(x, shifts, pad)
    return x
