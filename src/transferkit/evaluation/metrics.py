"""Accuracy and its uncertainty. Computed in fp32 with deterministic kernels, exactly as a user
would run the saved model, so the numbers are identical from run to run."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from transferkit.layout import channels_last, to_nhwc

Z95 = 1.959963984540054


# each test-time augmentation setting and the forward passes it costs per image
VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}
TTA = tuple(VIEWS)


def _views(model: torch.nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits of one batch, averaged over the test-time views: the image and its mirror (flip);
    and also both shifted by one pixel up-left and down-right (flip_translate: airbench's six
    views, the unshifted pair weighted as much as the two shifted pairs together)."""
    logits = model(x)
    if tta == "none":
        return logits
    logits = (logits + model(x.flip(-1))) / 2
    if tta == "flip":
        return logits
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[-2:]
    shifted = [to_nhwc(padded[..., :h, :w]), to_nhwc(padded[..., 2:, 2:])]
    return 0.5 * logits + 0.25 * sum((model(v) + model(v.flip(-1))) / 2 for v in shifted)


def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, tta: str = "none",
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits (on the CPU) for uint8 images, batched, without gradients, in fp32 and channels_last
    (transferkit/layout.py), with optional test-time augmentation (TTA). On a GPU the kernels are
    the deterministic ones and TF32 is off, so the numbers repeat from run to run there too."""
    device = torch.device(device)
    model.eval()
    out = []
    with channels_last(model):
        model.to(device)  # outside inference_mode: the weights must stay trainable tensors
        try:
            with torch.inference_mode(), deterministic_kernels(device):
                for start in range(0, len(images), batch_size):
                    x = to_nhwc(images[start:start + batch_size].to(device).float().div_(255))
                    out.append(_views(model, x, tta).float().cpu())
        finally:
            model.to("cpu")
    return torch.cat(out) if out else torch.zeros(0)


def predict_onnx(path, images: torch.Tensor, batch_size: int, tta: str = "none",
                 threads: int | None = None) -> torch.Tensor:
    """`predict` for an ONNX file, run by ONNX Runtime on the CPU: the same views and averaging."""
    from transferkit.deploy.sessions import ort_session

    session = ort_session(path, threads or torch.get_num_threads())
    name = session.get_inputs()[0].name

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0])

    return torch.cat([_views(model, images[i:i + batch_size].float().div(255), tta)
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0)


@contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


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
    per-image differences (paired: it accounts for images both models get right or wrong), widened by the
    continuity correction 1/n: without it, a handful of images on which the two differ (4 to 0) excludes 0 where
    McNemar's exact test finds no difference."""
    d = correct_a.float() - correct_b.float()
    n = len(d)
    mean = float(d.mean())
    half = z * float(d.std(unbiased=True)) / math.sqrt(n) + 1 / n if n > 1 else float("inf")
    return {"difference": mean, "ci95": [mean - half, mean + half], "n": n}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    k = len(classes)
    pred = logits.argmax(1)
    correct = int((pred == labels).sum())
    n = len(labels)
    lo, hi = wilson_interval(correct, n)
    # by hand, not torchmetrics: two bincounts, where importing torchmetrics costs seconds per
    # process on machines that have its optional dependencies (it imports transformers)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    per_class = confusion.diag().float() / confusion.sum(1).clamp_min(1).float()
    return {
        "top1": correct / n,
        "top1_ci95": [lo, hi],
        "n_test": n,
        "per_class": {c: float(a) for c, a in zip(classes, per_class)},
        "confusion": confusion.tolist(),
    }


# Two-sided 95% quantiles of Student's t by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    """The 95% critical value of t; a df not tabulated takes the next lower one's, which is larger
    (the quantile falls as df grows), so the interval errs wide."""
    return T95[max(k for k in T95 if k <= df)]


def mean_difference(diffs: list[float]) -> dict:
    """The mean of paired differences (one per seed) with a 95% t interval: the spread across
    seeds, training noise included (critical value: `t95`)."""
    import statistics

    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = t95(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"difference": mean, "ci95": [mean - half, mean + half], "pairs": n,
            "method": f"paired by seed over {n} seeds (t interval)"}
