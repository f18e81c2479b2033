"""LightningDataModule over prepared uint8 tensors.

Batches stay uint8 until they reach the training device (4x less to copy); conversion to
float and augmentation happen there, batched (see ClassifierModule.on_after_batch_transfer).
A plain DataLoader over a TensorDataset keeps Lightning's DDP sampler handling for free.
"""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset


class TaskDataModule(pl.LightningDataModule):
    def __init__(self, task: dict, batch_size: int, eval_batch_size: int = 1024, val_split: str = "val"):
        super().__init__()
        self.task, self.batch_size, self.eval_batch_size = task, batch_size, eval_batch_size
        self.val_split = val_split

    @property
    def num_classes(self) -> int:
        return len(self.task["classes"])

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        ds = TensorDataset(self.task[f"{split}_x"], self.task[f"{split}_y"])
        # drop_last on train keeps every step the same shape (BatchNorm, compiled graphs)
        return DataLoader(ds, batch_size=min(batch_size, len(ds)), shuffle=shuffle,
                          drop_last=shuffle and len(ds) >= batch_size, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.task.get(f"{self.val_split}_y", ())) == 0:
            return []
        return self._loader(self.val_split, False, self.eval_batch_size)
