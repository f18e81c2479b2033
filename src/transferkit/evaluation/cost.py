"""What a model costs to keep and to run: parameters, MACs, file size, CPU latency at
batch 1 (median) and throughput at a large batch. Latency and throughput are measurements,
so they go to timing.json, not to the bit-reproducible metrics.json."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from transferkit.layout import all_channels_last, channels_last, to_nhwc


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: torch.nn.Module, input_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch's FLOP counter / 2)."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size))
    return counter.get_total_flops() // 2


def cpu_latency_ms(models: dict[str, torch.nn.Module], repeats: int, input_size: int = 32,
                   warmup: int = 5) -> dict[str, float]:
    """Median batch-1 latency of each model, in channels_last as `predict` runs it. The models
    take turns, one call each per round, so a slow spell of the machine (other processes,
    frequency changes) hits all of them alike and the ratios between models stay fair."""
    x = to_nhwc(torch.rand(1, 3, input_size, input_size))
    times: dict[str, list[float]] = {name: [] for name in models}
    with all_channels_last(models.values()), torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                t = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def cpu_throughput(model: torch.nn.Module, batch: int, repeats: int, input_size: int = 32) -> float:
    """Images per second at `batch` in channels_last, best of `repeats` (the least disturbed run)."""
    model.eval()
    x = to_nhwc(torch.rand(batch, 3, input_size, input_size))
    best = float("inf")
    with channels_last(model), torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return batch / best


def file_size(path: Path) -> int:
    return path.stat().st_size
