"""A raw dataset as every source returns it: class names and uint8 NCHW images with labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N], indices into RawDataset.classes


@dataclass
class RawDataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
