"""How fast a model runs on this CPU: latency at batch 1 (median) and throughput at a large
batch. Measurements, so they go to timing.json, not to the bit-reproducible metrics.json; kept
apart from evaluation/cost.py so that a change to how speed is measured reruns no training stage."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

import torch

from transferkit.layout import all_channels_last, to_nhwc


def latency_ms(runners: dict[str, Callable[[], object]], repeats: int, block: int = 10) -> dict[str, float]:
    """Median seconds x 1000 of each runner (a call with its input bound). They take turns in
    blocks of `block` calls, the order rotating every round, so a slow spell of the machine
    hits all of them alike; the first call of a block is not timed, so one runtime's idle
    threads (ONNX Runtime and OpenMP spin for a while after a call) do not bill the next."""
    if not runners:
        return {}
    names = list(runners)
    times: dict[str, list[float]] = {k: [] for k in names}
    for run in runners.values():
        for _ in range(5):  # warm up every runner
            run()
    for r in range(-(-repeats // block)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runners[name]()
            for _ in range(min(block, repeats - len(times[name]))):
                t = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def cpu_latency_ms(models: dict[str, torch.nn.Module], repeats: int, input_size: int = 32,
                   onnx_files: dict[str, Path] | None = None) -> dict[str, float]:
    """Median batch-1 latency of each model, in channels_last as `predict` runs it, and of each
    ONNX file under ONNX Runtime with as many threads as torch uses. Each runtime's models take
    turns among themselves: ONNX Runtime's threads keep spinning after a call (its default, which
    deployments get too) and would slow down whichever PyTorch model ran next."""
    from transferkit.deploy.sessions import ort_session

    x = to_nhwc(torch.rand(1, 3, input_size, input_size))
    with all_channels_last(models.values()), torch.inference_mode():
        result = latency_ms({name: (lambda m=m.eval(): m(x)) for name, m in models.items()}, repeats)
    sessions = {name: ort_session(path, torch.get_num_threads()) for name, path in (onnx_files or {}).items()}
    feed = x.contiguous().numpy()
    if sessions:
        result |= latency_ms({name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}))
                              for name, s in sessions.items()}, repeats)
    return result


def onnx_throughput(files: dict[str, Path], batch: int, repeats: int, input_size: int = 32) -> dict[str, float]:
    """Images per second of each ONNX file under ONNX Runtime at `batch`, best of `repeats` rounds.
    The files take turns within a round, so a slow spell of the machine hits them alike, with one
    session alive at a time: an idle session's threads slow the running one down."""
    from transferkit.deploy.sessions import ort_session

    feed = torch.rand(batch, 3, input_size, input_size).numpy()
    best = dict.fromkeys(files, float("inf"))
    for _ in range(repeats):
        for name, path in files.items():
            session = ort_session(path, torch.get_num_threads())
            run = lambda s=session: s.run(None, {s.get_inputs()[0].name: feed})  # noqa: E731
            run()
            t = time.perf_counter()  # one timed call a round, as cpu_throughput times: best of as many
            run()
            best[name] = min(best[name], time.perf_counter() - t)
            del session, run
    return {name: batch / seconds for name, seconds in best.items()}


def cpu_throughput(models: dict[str, torch.nn.Module], batch: int, repeats: int,
                   input_size: int = 32) -> dict[str, float]:
    """Images per second of each model at `batch` in channels_last, best of `repeats` rounds in
    which the models take turns, so a slow spell of the machine hits them alike."""
    x = to_nhwc(torch.rand(batch, 3, input_size, input_size))
    best = dict.fromkeys(models, float("inf"))
    with all_channels_last(models.values()), torch.inference_mode():
        for model in models.values():
            model.eval()(x)  # warm up every model
        for _ in range(repeats):
            for name, model in models.items():
                t = time.perf_counter()
                model(x)
                best[name] = min(best[name], time.perf_counter() - t)
    return {name: batch / seconds for name, seconds in best.items()}


def busy_seconds() -> tuple[float, float] | None:
    """CPU seconds since boot that the cores this process may run on spent busy or stolen by a hypervisor (Linux's
    /proc/stat), and this process's own (every thread): over a stretch of time, the first's growth less the
    second's is other work on its cores."""
    try:
        import resource

        mine = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        ticks = [sum(int(v) for i, v in enumerate(line.split()[1:9]) if i not in (3, 4))  # not idle, iowait
                 for line in Path("/proc/stat").read_text().splitlines() if line.split(maxsplit=1)[0] in mine]
    except (ImportError, AttributeError, OSError, ValueError, IndexError):  # not Linux: nothing to say
        return None
    if len(ticks) != len(mine) or (cpu_quota() or len(mine)) < len(mine):
        return None  # a container's /proc/stat that numbers its CPUs otherwise, or a quota's share of many cores
    own = resource.getrusage(resource.RUSAGE_SELF)
    return sum(ticks) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The cores' worth of CPU time that this process's cgroup (v2) and those above it allow; None where none
    sets a limit (or off Linux)."""
    try:
        group = root / membership.read_text().partition("0::/")[2].strip()
    except OSError:
        return None
    limits = []
    for folder in (group, *group.parents):
        with suppress(OSError, ValueError):  # no such file, or "max": no limit there
            quota, period = (folder / "cpu.max").read_text().split()
            limits.append(int(quota) / int(period))
        if folder == root:
            break
    return min(limits, default=None)


@contextmanager
def other_work(into: dict):
    """Sets into["other_cores"]: the cores' worth of CPU time that other processes (and a hypervisor) took
    while the block ran. Timings taken beside other work are slower than the machine gives on its own."""
    start, t = busy_seconds(), time.perf_counter()
    yield
    end = busy_seconds()
    if start and end:
        into["other_cores"] = round(max((end[0] - start[0]) - (end[1] - start[1]), 0.0) / (time.perf_counter() - t), 2)
