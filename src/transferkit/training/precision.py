"""`trainer.precision: auto`: the precision this machine trains fastest in.

bf16 autocast is faster than fp32 on CPUs whose matrix units do bf16 natively and slower, often
far slower, on the others, so no fixed default suits every machine. auto picks bf16-mixed on CUDA
GPUs that run bf16 natively (16-mixed on older ones), and on a CPU only where a bf16 matrix
multiply measures clearly faster than an fp32 one; the probe takes a fraction of a second and its
result is cached per CPU (model name and instruction set), torch version and thread count, so
every stage of a run agrees.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from transferkit.errors import TransferkitError
from transferkit.plain import plain_json

CPU_BF16_MIN_SPEEDUP = 1.2  # below this the probe's noise could flip the choice between runs


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferkit" / "precision.json"


def cpuinfo(field: str) -> str:
    """The value of /proc/cpuinfo's first `field` line ('' where there is none, or no such file)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), "")


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def matmul_gflops(dtype: torch.dtype, max_n: int = 1024, repeats: int = 3, slow_s: float = 0.02) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n matrix product on the CPU, n doubling from 128 up to
    `max_n` until one product takes `slow_s` and the rate has stopped growing with n: an emulated
    dtype is measured in a fraction of a second, not in the seconds a 1024 x 1024 product of it takes,
    while on a busy machine, where a product of any size waits about as long for a descheduled
    thread, the probe goes on to sizes whose time is the arithmetic's."""
    n, rate = 128, 0.0
    # a generator of its own: a run seeds torch's before it resolves `precision: auto`, and a first run (nothing
    # cached) that drew from it would start its model from other weights than every later run
    gen = torch.Generator().manual_seed(0)
    while True:
        a, b = torch.randn(n, n, dtype=dtype, generator=gen), torch.randn(n, n, dtype=dtype, generator=gen)
        a @ b  # warm-up: thread pool, kernel selection
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        previous, rate = rate, 2 * n ** 3 / best / 1e9
        if n >= max_n or (best >= slow_s and rate < 2 * previous):
            return rate
        n *= 2


def matmul_peaks() -> dict[str, float]:
    """This CPU's fp32 and bf16 matmul GFLOP/s, measured now."""
    return {f"{name}_gflops": round(matmul_gflops(dtype), 1) for name, dtype in (("fp32", torch.float32),
                                                                              ("bf16", torch.bfloat16))}


def cpu_isa() -> str:
    """The instruction set torch dispatches to, and the CPU's bf16 extensions: a VM's model name
    (often just "AMD EPYC") is shared by CPUs with and without them."""
    flags = cpuinfo("flags").split()
    return " ".join([torch.backends.cpu.get_cpu_capability(), *(f for f in ("avx512_bf16", "amx_bf16") if f in flags)])


def cpu_matmul() -> dict:
    """This CPU's measured fp32 and bf16 matmul GFLOP/s and their ratio (measured once, cached)."""
    key = f"{cpu_model()} | {cpu_isa()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_file()
    try:
        cache = plain_json(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}  # an entry not as written here is measured again
    if not (isinstance(cache.get(key), dict) and all(isinstance(cache[key].get(k), (int, float)) for k in (
            "fp32_gflops", "bf16_gflops", "speedup"))):
        peaks = matmul_peaks()
        cache[key] = {**peaks, "speedup": round(peaks["bf16_gflops"] / peaks["fp32_gflops"], 3)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=2))
            tmp.replace(path)
        except OSError:  # a read-only home: probe again next time
            pass
    return {"cpu": cpu_model(), "isa": cpu_isa(), "threads": torch.get_num_threads(), **cache[key]}


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul speed on this CPU."""
    return float(cpu_matmul()["speedup"])


def uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def eval_device(accelerator: str) -> str:
    """Where a run's models are scored: the first visible GPU if it trained on GPUs (fp32, deterministic kernels)."""
    return "cuda" if uses_cuda(accelerator) else "cpu"


def check_accelerator(trainer, trains: bool = True) -> None:
    """At run time, not in the config's checks: params.yaml may be written for another machine. The precision and
    SyncBatchNorm are a fit's alone: evaluate on a CPU node runs with a GPU cluster's params file."""
    accelerator = str(trainer.accelerator)
    if trains and trainer.sync_batchnorm and not uses_cuda(accelerator):
        raise TransferkitError(f"trainer.sync_batchnorm=true works only on CUDA GPUs (torch's SyncBatchNorm), and "
                               f"trainer.accelerator={accelerator} trains on the CPU here. Fix: set "
                               f"trainer.sync_batchnorm=false, or run on GPUs.")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not uses_cuda(accelerator)
                                      and not torch.backends.mps.is_available())
    if trains and on_cpu and str(trainer.precision).startswith("16"):
        raise TransferkitError(f"trainer.precision={trainer.precision} is fp16, which torch runs on GPUs only, and "
                               f"trainer.accelerator={accelerator} trains on the CPU here. Fix: set "
                               f"trainer.precision=auto (bf16 where this CPU runs it faster, else fp32), 32-true or "
                               f"bf16-mixed.")
    missing = {"gpu": "CUDA GPU", "cuda": "CUDA GPU", "mps": "Apple GPU (MPS)"}.get(accelerator)
    if missing and not (torch.backends.mps.is_available() if accelerator == "mps" else torch.cuda.is_available()):
        raise TransferkitError(f"trainer.accelerator={accelerator}, but torch sees no {missing} on this machine. "
                               f"Fix: train on the CPU here (trainer=cpu; for dvc repro `transferkit params "
                               f"trainer=cpu` with the other overrides you use), or run where torch sees that device.")


def processes(trainer) -> int | str:
    """The processes a fit with `trainer` settings runs in, as Lightning counts them (devices 'auto' or -1: every
    GPU torch sees; "0,2" or [0, 2]: GPUs by index); a value Lightning refuses is returned as set, for it to say so."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices) * int(trainer.get("num_nodes") or 1)
    if str(devices) in ("auto", "-1"):
        devices = torch.cuda.device_count() if uses_cuda(str(trainer.get("accelerator", "auto"))) else 1
    try:
        return int(devices) * int(trainer.get("num_nodes") or 1)
    except (TypeError, ValueError):
        return str(devices)


def resolve_precision(setting, accelerator: str) -> str:
    """The Lightning precision to train in: `setting` itself unless it is 'auto'."""
    if str(setting) != "auto":
        return str(setting)
    if uses_cuda(accelerator):
        # native bf16 only: torch also reports GPUs that emulate it (before Ampere), where it is slower
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):  # as Lightning picks
        return "32-true"  # the CPU's probe says nothing of an Apple GPU
    return "bf16-mixed" if cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP else "32-true"


def trained_in(timing: dict) -> str:
    """A training stage's timing.json as how it trained: precision, device and, under DDP, the processes, whose
    batches made each step together (a recipe of their own)."""
    many = f", {timing['processes']} processes" if (timing.get("processes") or 1) > 1 else ""
    return f"{timing['precision']} on {timing['device']}{many}"
