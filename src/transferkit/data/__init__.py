"""Data: where raw images come from (sources), how a task is carved out of them (tasks),
and how prepared tensors are fed to training with batched augmentation (loader)."""
