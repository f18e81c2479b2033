"""Batches of a prepared task served from the training device.

A split goes to the device once, as uint8 (4x less memory than float). An epoch is a device
permutation sliced into batches; each batch is gathered, converted to float and augmented there
with batched tensor ops. Nothing is collated sample by sample and nothing waits for the host:
the random draws of an epoch come from a device generator seeded by (seed, epoch), so an epoch is
the same whether the run went straight through or resumed from a checkpoint. Under DDP each rank
takes every world_size-th item of the permutation, and draws its augmentation from its own seed
(rank_seed).
"""

from __future__ import annotations

import hashlib
import math
import sys
from typing import Callable, Iterator

import pytorch_lightning as pl
import torch

from transferkit.data.augment import FLIP_MODES, augment, draw_flips, draw_shifts
from transferkit.errors import TransferkitError


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def module_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of the training module's own draws in an epoch (dropout, mixup): another stream than every
    rank's batches (rank_seed), whose seed would draw the very same numbers (a dropout mask equal to the
    flips). A hash, so that no arithmetic on (seed, epoch, rank) lands on a batch seed."""
    digest = hashlib.blake2b(f"module {seed} {epoch} {rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: any seed torch takes


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one DDP rank's own draws in an epoch (flips, shifts), so that the
    i-th images of the ranks' batches are not augmented alike. Rank 0's is the epoch seed: one
    process draws as a run without DDP does. Modulo 2**64, the seeds torch takes (a large seed's exceed them)."""
    return epoch_seed(epoch_seed(seed, epoch), rank) % 2**64 if rank else epoch_seed(seed, epoch)


class DeviceBatches:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, device: torch.device,
                 train: bool, flip: str = "none", translate: int = 0, seed: int = 0,
                 epoch: Callable[[], int] = lambda: 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = True):
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, not {flip!r}")
        self.device, self.train, self.flip, self.pad = torch.device(device), train, flip, translate
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.channels_last = channels_last
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device)
        n = len(self.labels)
        if n < world_size:  # a rank without images: an empty fit, or ranks that wait for its validation for ever
            raise TransferkitError(f"a split of {n} images cannot be shared by {world_size} training processes: each "
                                   f"needs one at least. Fix: prepare more images per class (data.*_per_class), or "
                                   f"train in fewer processes (trainer.devices, trainer.num_nodes).")
        if train:  # equal shards (the remainder is dropped), equal batches: every step the same shape
            self.per_rank = n // world_size
            self.batch_size = min(batch_size, self.per_rank)
            self.steps = self.per_rank // self.batch_size if self.batch_size else 0
        else:
            self.per_rank = len(range(rank, n, world_size))
            self.batch_size = batch_size
            self.steps = math.ceil(self.per_rank / batch_size)
        if flip == "alternating":  # airbench: a fixed random half mirrored on even epochs, the other half on odd
            gen = torch.Generator(self.device).manual_seed(seed)
            self.base_flips = draw_flips(n, gen, self.device)

    def __len__(self) -> int:
        return self.steps

    def _order(self, gen: torch.Generator | None) -> torch.Tensor:
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=gen) if self.train
                 else torch.arange(n, device=self.device))
        return order[self.rank::self.world_size][:self.per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch()
        gen = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, epoch)) if self.train else None
        order = self._order(gen)  # the same permutation on every rank: each takes its own shard of it
        if self.train and self.rank:  # rank 0 draws on from the permutation's generator, as one process does
            gen.manual_seed(rank_seed(self.seed, epoch, self.rank))
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)
            if self.train:
                b = len(idx)  # a shape: known on the host, no wait
                flips = None
                if self.flip == "random":
                    flips = draw_flips(b, gen, self.device)
                elif self.flip == "alternating":
                    flips = self.base_flips[idx] if epoch % 2 == 0 else ~self.base_flips[idx]
                shifts = draw_shifts(b, self.pad, gen, self.device) if self.pad > 0 else None
                x = augment(x, flips, shifts, self.pad)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def batch_note(key: str, batch_size: int, batches: DeviceBatches) -> str | None:
    """What a fit trains on where it is not `key`'s batch in one process, which the settings alone do not show:
    a split smaller than the batch is one batch, and DDP's processes each take a batch (a recipe of its own)."""
    n, world, used = len(batches.labels), batches.world_size, batches.batch_size
    a = " a process" if world > 1 else ""
    notes = [f"{key}={batch_size} is more than the {batches.per_rank} training images{a}: it trains on batches of "
             f"{used}"] if used < batch_size else []
    if world > 1:  # each process's shard, as one process's split, drops what does not fill its last batch
        steps, one = batches.steps, min(batch_size, n)
        notes.append(f"{world} processes train on batches of {used} each, {used * world} a step together: "
                     f"{steps} step{'s' * (steps != 1)} an epoch on {steps * used * world} of the {n} images, against "
                     f"{n // one} on {n // one * one} in one process, at the same learning rate ({key} is per "
                     f"process; conf/trainer/ddp.yaml says how to keep one process's recipe)")
    return "; ".join(notes) + "." if notes else None


class TaskDataModule(pl.LightningDataModule):
    """A prepared task's train and validation splits as DeviceBatches on the trainer's device."""

    def __init__(self, task: dict, batch_size: int, eval_batch_size: int = 1024, val_split: str = "val", *,
                 flip: str = "random", translate: int = 2, seed: int = 0, channels_last: bool = True,
                 batch_key: str = "batch_size"):
        super().__init__()
        self.task, self.batch_size, self.eval_batch_size = task, batch_size, eval_batch_size
        self.batch_key = batch_key  # the setting batch_size comes from, for batch_note
        self.val_split, self.flip, self.translate, self.seed = val_split, flip, translate, seed
        self.channels_last = channels_last

    @property
    def num_classes(self) -> int:
        return len(self.task["classes"])

    def _batches(self, split: str, train: bool) -> DeviceBatches:
        t = self.trainer
        return DeviceBatches(self.task[f"{split}_x"], self.task[f"{split}_y"],
                             self.batch_size if train else self.eval_batch_size,
                             device=t.strategy.root_device, train=train, flip=self.flip if train else "none",
                             translate=self.translate if train else 0, seed=self.seed,
                             epoch=lambda: t.current_epoch, rank=t.global_rank, world_size=t.world_size,
                             channels_last=self.channels_last)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # DeviceBatches yields batches on the training device already

    def train_dataloader(self) -> DeviceBatches:
        batches = self._batches("train", True)
        if self.trainer.global_rank == 0 and (note := batch_note(self.batch_key, self.batch_size, batches)):
            print(note, file=sys.stderr)
        return batches

    def val_dataloader(self) -> DeviceBatches | list:
        if len(self.task.get(f"{self.val_split}_y", ())) == 0:
            return []
        return self._batches(self.val_split, False)
