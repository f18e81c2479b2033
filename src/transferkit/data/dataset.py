"""A raw dataset as every source returns it: class names and uint8 NCHW images with labels."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

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


def layout_fix(path: Path) -> str:
    """How to lay out an image folder with no train/<class>/ and test/<class>/ files: one of class folders alone
    (torchvision's ImageFolder layout) lacks the split."""
    try:
        classes = sorted(d.name for d in path.iterdir() if d.is_dir() and any(f.is_file() for f in d.iterdir()))
    except OSError:  # an archive, or unreadable
        classes = []
    if classes and not {"train", "test"} & set(classes):
        shown = ", ".join(classes[:5]) + (f" and {len(classes) - 5} more" if len(classes) > 5 else "")
        return (f"{path} holds class folders alone ({shown}), with no split: move some of each class's images to "
                f"test/<class>/ and the rest to train/<class>/")
    return "arrange the images in that layout (or, for an archive in it, give that file)"
