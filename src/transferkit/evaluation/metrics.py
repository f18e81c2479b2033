"""Accuracy and its uncertainty. Computed on the CPU in fp32, exactly as a user would run
the saved model, so the numbers are identical from run to run."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

from transferkit.layout import channels_last, to_nhwc

Z95 = 1.959963984540054


def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, tta_flip: bool) -> torch.Tensor:
    """Logits for uint8 images, batched, without gradients, in channels_last (transferkit/layout.py);
    optional mirror test-time augmentation."""
    model.eval()
    out = []
    with channels_last(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = to_nhwc(images[start:start + batch_size].float().div_(255))
            logits = model(x)
            if tta_flip:
                logits = (logits + model(x.flip(-1))) / 2
            out.append(logits.float())
    return torch.cat(out) if out else torch.zeros(0)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved near 0 and 1, unlike Wald)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp: at p = 0 or 1 rounding can put a bound a hair on the wrong side of p
    return (max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p)))


def paired_difference(correct_a: torch.Tensor, correct_b: torch.Tensor, z: float = Z95) -> dict:
    """Accuracy of A minus accuracy of B on the same images, with a 95% interval from the
    per-image differences (paired: it accounts for images both models get right or wrong)."""
    d = correct_a.float() - correct_b.float()
    n = len(d)
    mean = float(d.mean())
    half = z * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("inf")
    return {"difference": mean, "ci95": [mean - half, mean + half], "n": n}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    k = len(classes)
    pred = logits.argmax(1)
    correct = int((pred == labels).sum())
    n = len(labels)
    lo, hi = wilson_interval(correct, n)
    per_class = multiclass_accuracy(pred, labels, num_classes=k, average=None)
    confusion = multiclass_confusion_matrix(pred, labels, num_classes=k)
    return {
        "top1": correct / n,
        "top1_ci95": [lo, hi],
        "n_test": n,
        "per_class": {c: float(a) for c, a in zip(classes, per_class)},
        "confusion": confusion.tolist(),
    }
