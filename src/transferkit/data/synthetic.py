"""Synthetic images: a task of any classes, with no files (`experiment=smoke`, the tests)."""

import zlib

import torch

from transferkit.data.dataset import RawDataset, Split, class_name


def make_synthetic(classes: list[str], train_per_class: int, test_per_class: int,
                   image_size: int = 32, seed: int = 0) -> RawDataset:
    """Learnable class-conditional images: each class is an oriented colour grating
    (its look fixed by the class name) with random phase and noise per image, drawn from a stream
    of the class's own: two tasks made with one seed share no noise."""
    classes = [class_name(c) for c in classes]
    draws = {c: torch.Generator().manual_seed(zlib.crc32(f"{seed}/{c}".encode())) for c in classes}
    yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")

    def images(cls: str, n: int) -> torch.Tensor:
        look, gen = torch.Generator().manual_seed(zlib.crc32(cls.encode())), draws[cls]
        colour = torch.rand(3, 1, 1, generator=look) * 0.6 + 0.2
        angle = torch.rand(1, generator=look) * torch.pi
        freq = 0.2 + torch.rand(1, generator=look) * 0.6
        phase = torch.rand(n, 1, 1, 1, generator=gen) * 2 * torch.pi
        wave = torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
        x = colour * (0.5 + 0.4 * wave) + 0.15 * torch.randn(n, 3, image_size, image_size, generator=gen)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def split(n: int) -> Split:
        return Split(torch.cat([images(c, n) for c in classes]),
                     torch.arange(len(classes)).repeat_interleave(n))

    return RawDataset("synthetic", list(classes), split(train_per_class), split(test_per_class))
