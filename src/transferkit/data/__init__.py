"""Data: where raw images come from (sources: image folders and archives, the official CIFAR files
in cifar, synthetic images), how a task is carved out of them (tasks), and how prepared tensors
are served to training from the device with batched augmentation (loader, augment)."""
