"""A raw dataset as every source returns it: class names and uint8 NCHW images with labels."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch


def class_name(name: str) -> str:
    """A class's name in one Unicode form (NFC): macOS writes folder names decomposed (`cafe` + an accent),
    a config typed elsewhere composed (`café`), and the two are one class."""
    return unicodedata.normalize("NFC", name)


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
