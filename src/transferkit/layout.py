"""Memory layout for CPU inference.

oneDNN's CPU convolutions work on channels-last (NHWC) tensors: given NCHW ones, PyTorch
reorders every activation on the way in and out of each convolution. Models are therefore run
in channels_last whatever layout their images come in (bench/inference.py measures the gain),
with the same logits up to float rounding. Checkpoints stay in the default layout: the
conversion lasts only while the model runs.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator

import torch


@contextmanager
def channels_last(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` with its 4-D weights in channels_last while the block runs, then back in the
    default layout (what checkpoints and exporters expect). Convert inputs with `to_nhwc`.

    Not under inference_mode: the converted weights must stay ordinary tensors, usable by
    autograd if the model is trained again afterwards."""
    with torch.inference_mode(False):
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        with torch.inference_mode(False):
            model.to(memory_format=torch.contiguous_format)


@contextmanager
def all_channels_last(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(channels_last(model))
        yield


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """A 4-D batch in channels_last (other tensors as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
