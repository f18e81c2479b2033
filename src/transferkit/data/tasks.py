"""Carve a task (classes by name, per-class counts, a validation split) out of a raw dataset.

A prepared task is a plain dict of uint8 tensors, written once by the prepare stage and
read by every training stage: no image is decoded twice.
"""

from __future__ import annotations

import difflib

import torch

from transferkit.data.dataset import class_name
from transferkit.data.sources import RawDataset
from transferkit.errors import TransferkitError


def task_fault(task, splits=("train", "val", "test")) -> str | None:
    """What makes `task` no prepared task (None: nothing): in every split of `splits`, uint8 images [N, 3, S, S]
    of one size, one label per image, each the index of one of its classes."""
    classes = task.get("classes") if isinstance(task, dict) else None
    if not (isinstance(classes, list) and len(classes) >= 2):
        return "it holds no list of classes"
    for split in splits:
        x, y = task.get(f"{split}_x"), task.get(f"{split}_y")
        if not (torch.is_tensor(x) and torch.is_tensor(y)):
            return f"it lacks {split}_x or {split}_y"
        first = task[f"{splits[0]}_x"]
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != first.shape[2:]:
            return (f"its {split}_x is {x.dtype} of shape {tuple(x.shape)}, not uint8 images [N, 3, S, S]"
                    f"{f' as {splits[0]}_x' if split != splits[0] else ''}")
        # a view that repeats its storage (stride 0) claims images a file of a few bytes never held
        if any(t.untyped_storage().nbytes() < t.numel() * t.element_size() for t in (x, y)):
            return f"its {split}_x or {split}_y claims {len(x)} images, more than the file holds (a view repeating it)"
        if y.dtype != torch.int64 or y.shape != (len(x),):
            return f"its {split}_y is {y.dtype} of shape {tuple(y.shape)}, not one int64 label per image ({len(x)})"
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(classes)):
            return f"its {split}_y holds labels outside 0..{len(classes) - 1} (one per class)"
    return None


def check_disjoint(source_classes, target_classes) -> None:
    """Source and target tasks drawn from one dataset share no class."""
    if both := sorted({class_name(c) for c in source_classes} & {class_name(c) for c in target_classes}):
        raise TransferkitError(f"classes {both} are in both data.source.classes and data.target.classes: the target "
                               f"test images of a class the backbone was pretrained on would leak. Fix: remove them "
                               f"from one of the two lists.")


def check_class_list(classes: list[str], role: str) -> None:
    if len(classes) < 2:
        raise TransferkitError(f"data.{role}.classes needs at least 2 classes, got {classes}. "
                               f"Fix: list two or more class names.")
    names = [class_name(c) for c in classes]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise TransferkitError(f"data.{role}.classes lists {dupes} more than once. Fix: list each class once.")


def _near(name: str, names: list[str]) -> list[str]:
    """The other names (every folder seen, decoded or not) a user may have meant: close, or equal but for case,
    which difflib's matching does not see."""
    others = [c for c in names if c != name]
    return sorted({*difflib.get_close_matches(name, others, n=3),
                   *(c for c in others if c.casefold() == name.casefold())})


def _check_classes(raw: RawDataset, classes: list[str], role: str) -> None:
    check_class_list(classes, role)
    for c in classes:
        if c not in raw.classes:
            hint = f" Did you mean {near}?" if (near := _near(c, raw.classes)) else ""
            if raw.name == "cifar100":  # its pickles hold 20 superclass labels too, which are no classes here
                hint += " CIFAR-100's classes are its 100 fine labels; a superclass such as aquatic_mammals is none."
            raise TransferkitError(  # a folder of files that are no images (.heic, .txt) is no class
                f"unknown class '{c}' in data.{role}.classes: {raw.name} has {raw.classes}.{hint} Fix: use one of "
                f"those names (in an image folder or archive, a class is a folder holding PNG, JPEG, ... files; "
                f"a format PIL does not read, such as .heic, is skipped).")


def image_hashes(images: torch.Tensor) -> list[int]:
    """Each image's hash, pixel for pixel: equal images, equal hashes (64 bits, so two different images share one
    with a chance far below one in a billion at CIFAR's sizes)."""
    return [hash(row.tobytes()) for row in images.flatten(1).numpy()]


def _copied(test: torch.Tensor, train: torch.Tensor) -> bool:
    """Whether every test image is, pixel for pixel, one of the train images: test/<class> a link to (or a copy of)
    train/<class>, which would score a model on images it trained on."""
    if not len(test) or not (train == test[0]).flatten(1).all(1).any():  # the first image settles most cases
        return False
    seen = set(image_hashes(train))
    return all(h in seen for h in image_hashes(test))


def select_task(raw: RawDataset, classes: list[str], *, train_per_class: int | None,
                val_per_class: int, test_per_class: int | None, seed: int, role: str) -> dict:
    """Per class: a seeded shuffle of its train images, the first `train_per_class` for
    training and the next `val_per_class` for validation (None = all that remain);
    test images come from the official test split only: all of them, or `test_per_class` drawn
    by a seeded shuffle of their own (the first ones in file order may be one photo session)."""
    classes = [class_name(c) for c in classes]
    _check_classes(raw, classes, role)
    gen, test_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    parts: dict[str, list] = {k: [] for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
    for new_label, name in enumerate(classes):
        old = raw.classes.index(name)
        idx = torch.nonzero(raw.train.labels == old).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        if not len(idx):  # its folder in test/ only: no count is low enough
            hint = f" (a folder of a near name: {near})" if (near := _near(name, raw.classes)) else ""
            raise TransferkitError(
                f"class '{name}' has no train images in {raw.name}, only test images{hint}. Fix: put its training "
                f"images in train/{name}/ (named exactly as in test/; PNG, JPEG, ...: a format PIL does not read, "
                f"such as .heic, is skipped), or remove it from data.{role}.classes.")
        n_train = len(idx) - val_per_class if train_per_class is None else train_per_class
        if n_train <= 0 or n_train + val_per_class > len(idx):
            asks, lower = ((f"{train_per_class} train + {val_per_class} val", f"data.{role}.train_per_class or ")
                           if train_per_class is not None else (f"{val_per_class} val and at least 1 train", ""))
            raise TransferkitError(
                f"class '{name}' has {len(idx)} train image{'s' * (len(idx) != 1)} in {raw.name}, but data.{role} "
                f"asks for {asks}. Fix: lower {lower}data.{role}.val_per_class.")
        train_idx, val_idx = idx[:n_train], idx[n_train:n_train + val_per_class]
        test_idx = torch.nonzero(raw.test.labels == old).flatten()
        if test_per_class is not None:
            if test_per_class > len(test_idx):
                raise TransferkitError(
                    f"class '{name}' has {len(test_idx)} test images, data.{role}.test_per_class is "
                    f"{test_per_class}. Fix: lower it or set it to null (all).")
            test_idx = test_idx[torch.randperm(len(test_idx), generator=test_gen)[:test_per_class].sort().values]
        if _copied(raw.test.images[test_idx], raw.train.images[idx]):
            raise TransferkitError(
                f"every test image of class '{name}' in {raw.name} is also one of its train images (test/{name}/ a "
                f"link to or a copy of train/{name}/): its test score would be a score on training images. Fix: give "
                f"test/{name}/ images of its own.")
        for split, ix, images in (("train", train_idx, raw.train), ("val", val_idx, raw.train),
                                  ("test", test_idx, raw.test)):
            parts[f"{split}_x"].append(images.images[ix])
            parts[f"{split}_y"].append(torch.full((len(ix),), new_label, dtype=torch.long))
    tested = [name for name, y in zip(classes, parts["test_y"]) if len(y)]
    # a score over the others alone would read as the task's; pretraining needs no test split, evaluate does
    if (tested or role == "target") and len(tested) < len(classes):
        missing = [c for c in classes if c not in tested]
        why = f", which has some for {tested}: the test score would leave them out" if tested else \
            " (no test split): evaluate scores every model on the target's test images"
        near = {c: n for c in missing if (n := _near(c, raw.classes))}  # test/Blue beside train/blue
        raise TransferkitError(f"classes {missing} of data.{role}.classes have no test images in {raw.name}{why}"
                               f"{f' (folders of near names: {near})' if near else ''}. Fix: add test/<class>/ images "
                               f"for them (each folder named exactly as in train/), or remove them from "
                               f"data.{role}.classes.")
    task = {k: torch.cat(v) for k, v in parts.items()}
    task["classes"] = list(classes)
    task["dataset"] = raw.name
    return task


def task_summary(task: dict) -> dict:
    return {"dataset": task["dataset"], "classes": task["classes"],
            **{f"n_{s}": int(len(task[f"{s}_y"])) for s in ("train", "val", "test")}}


def train_sample(task: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` training images (uint8) and labels spread evenly over the train split, which is sorted
    by class: the first `n` would be one class."""
    idx = torch.linspace(0, len(task["train_y"]) - 1, n).round().long()
    return task["train_x"][idx], task["train_y"][idx]
