"""prepare: decode the raw dataset(s) once into compact uint8 tensors for the source task
(train/val/test) and the target task (train/val/test)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from transferkit.data.dataset import RawDataset
from transferkit.data.resolve import copies_of_one, locate, read_dataset
from transferkit.data.synthetic import make_synthetic
from transferkit.data.tasks import check_disjoint, image_hashes, select_task, task_summary
from transferkit.io import save_json, save_torch


def load_raw(cfg: DictConfig, role: str, where: Path | None, wanted: set[str]) -> RawDataset:
    d = cfg.data
    if d[role].dataset == "synthetic":
        # one seed for both tasks; the images differ because the class names do
        return make_synthetic(list(d[role].classes), d.synthetic.train_per_class,
                              d.synthetic.test_per_class, d.image_size, cfg.seed)
    return read_dataset(d[role].dataset, where, verify_checksums=d.verify_checksums, image_size=d.image_size,
                        wanted=wanted)


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    d = cfg.data
    # both datasets found (or downloaded) before either is decoded: a missing target fails in a second
    names = [d[role].dataset for role in ("source", "target")]
    found = {name: locate(name, Path(cfg.paths.data_dir), download=d.download)
             for name in dict.fromkeys(names) if name != "synthetic"}
    where = {role: found.get(name) for role, name in zip(("source", "target"), names)}
    # one dataset under two names (cifar10 and the archive it resolves to): one read, and no shared class
    same = None not in where.values() and where["source"].resolve() == where["target"].resolve()
    if None not in where.values() and copies_of_one(names, list(where.values()), Path(cfg.paths.data_dir)):
        check_disjoint(d.source.classes, d.target.classes)
    # cifar10_split takes both tasks from one archive: read (and decode) it once
    shared = load_raw(cfg, "source", where["source"], set(d.source.classes) | set(d.target.classes)) if same else None
    summary, trained = {}, set()  # the images trained on so far, by hash: the target's models start from the source's
    for role in ("source", "target"):
        spec = d[role]
        raw = shared or load_raw(cfg, role, where[role], set(spec.classes))
        task = select_task(raw, list(spec.classes), train_per_class=spec.train_per_class,
                           val_per_class=spec.val_per_class, test_per_class=spec.test_per_class,
                           seed=cfg.seed, role=role)
        train, val = set(image_hashes(task["train_x"])), image_hashes(task["val_x"])
        # a class's duplicates drawn into both splits; one dataset given twice (a folder and its archive), which
        # escapes check_disjoint; in summary.json too, where the report reads them: warnings scroll away
        seen_in = {"val_seen_in_train": sum(h in train for h in val), "train_seen_in_source": len(train & trained)}
        if seen := seen_in["val_seen_in_train"]:
            print(f"prepare: {seen} of the {role} task's {len(val)} val images are also its train images (pixel for "
                  f"pixel: the dataset's own duplicates): val accuracy, which chooses checkpoints and sweep settings, "
                  f"counts them as unseen. Fix: remove the duplicates from the train split of {d[role].dataset}.",
                  file=sys.stderr)
        if seen := seen_in["train_seen_in_source"]:
            print(f"prepare: {seen} of the target task's {len(task['train_y'])} train images are also source training "
                  f"images (pixel for pixel, in the source task's train or val split): pretraining learned them, so "
                  f"transfer's gain over scratch counts them. Fix: take the target task's classes from other images "
                  f"than the source task's ({d.source.dataset}).", file=sys.stderr)
        trained.update(train, val)
        # some: a dataset's own duplicates, or a copying slip (select_task refuses a test folder of train images)
        seen_in["test_seen_in_training"] = sum(h in trained for h in image_hashes(task["test_x"]))
        if seen := seen_in["test_seen_in_training"]:
            splits = "the source task's" if role == "source" else "the source or target task's"
            print(f"prepare: {seen} of the {role} task's {len(task['test_y'])} test images are also training images "
                  f"(pixel for pixel, in {splits} train or val split): their scores are scores on training images. "
                  f"Fix: remove those copies from the test (or train) split of {d[role].dataset}.", file=sys.stderr)
        save_torch(task, out / f"{role}.pt")
        summary[role] = {**task_summary(task), **{k: n for k, n in seen_in.items() if n}}
    save_json(summary, out / "summary.json")
    return summary
