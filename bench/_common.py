"""Shared by the bench/ scripts (not a package: each script puts bench/ on sys.path by being
run as `uv run python bench/NAME.py`)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def train_bf16() -> bool:
    """Whether the stages train in bf16 autocast on this machine (params.yaml's trainer.precision;
    auto: the precision probe decides): a benchmark of the training step runs as they do, never
    in one machine's best setting."""
    from transferkit.training.precision import resolve_precision

    return resolve_precision(params()["trainer"]["precision"], "cpu") == "bf16-mixed"


def conv_widths(model: torch.nn.Module) -> str:
    """Output channels of every convolution, e.g. 16/16/16/64/64/64/64."""
    from transferkit.prune.structured import conv_widths as widths

    return "/".join(map(str, widths(model)))


def prune_like_the_stage(model: torch.nn.Module, prune: dict, **overrides) -> dict:
    """prune_channels with params.yaml's `prune` settings (overrides win). taylor needs
    calibration images and is replaced by l2: with prune.scope=layer every layer loses the same
    share of channels, so the layer widths, which is what speed depends on, are the same."""
    from transferkit.prune.structured import prune_channels

    settings = {"criterion": "l2" if prune["criterion"] == "taylor" else prune["criterion"],
                "target": prune["target"], "ratio": prune["ratio"], "keep": list(prune["keep"]),
                "round_to": prune.get("round_to"), "scope": prune.get("scope", "layer"),
                "rates": list(prune.get("rates") or [])}
    return prune_channels(model, **{**settings, **overrides})


def params(path: Path | None = None) -> dict:
    """The composed pipeline settings (params.yaml): batch sizes and model widths."""
    return yaml.safe_load((path or ROOT / "params.yaml").read_text())


def load_target_task(artifacts: Path, seed: int = 0) -> tuple[dict, str]:
    """The prepared CIFAR target task if `prepare` has run, else synthetic uint8 images of
    the same shape and size (2,000 train images of 32x32, 5 classes)."""
    path = artifacts / "prepare" / "target.pt"
    if path.exists():
        task = torch.load(path, map_location="cpu", weights_only=True)
        return task, (f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                      f"({len(task['train_y'])} train images)")
    g = torch.Generator().manual_seed(seed)
    n, classes = 2000, ["a", "b", "c", "d", "e"]
    task = {"train_x": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            "train_y": torch.arange(n) % len(classes), "classes": classes}
    return task, f"synthetic uint8 ({n} train images; {path} not found)"


def machine() -> dict:
    """The CPU, torch, the fp32 and bf16 matmul peaks measured now (not the precision probe's
    cache: this VM's speed changes by the hour) at the current torch threads, the load average."""
    from transferkit.training.precision import cpu_isa, cpu_model, matmul_peaks

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "isa": cpu_isa(), **matmul_peaks(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def describe(m: dict) -> str:
    """machine() in one line: what every script prints before its timings and after them."""
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['isa']}), {m['torch_threads']} "
            f"threads; matmul peak fp32 {m['fp32_gflops']} / bf16 {m['bf16_gflops']} GFLOP/s; "
            f"load average {m['loadavg']}")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns: (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join("" if r.get(k) is None else format(r[k], f) for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """Seconds `cmd` took in `cwd` (transferkit and dvc of this environment), and its output."""
    from transferkit.project import run

    start = time.perf_counter()
    out = run(cmd, cwd, tail=60)
    return time.perf_counter() - start, out


@contextlib.contextmanager
def warm_commands(folder: Path, idle: int):
    """Commands started inside run with TRANSFERKIT_WARM=1 and `folder` (new, created here) as their
    temporary folder: a server of their own, started by the first of them, gone `idle` s after the last."""
    saved = dict(os.environ)
    folder.mkdir()
    os.environ.update(TRANSFERKIT_WARM="1", TRANSFERKIT_WARM_IDLE=str(idle), TMPDIR=str(folder))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def commit() -> str | None:
    """The checkout's commit (with '+changes' when files differ from it), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        # any change, untracked files too: a copy of the project takes in conf/ and src/ as they are, and the
        # scripts read params.yaml
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def provenance() -> dict:
    """What produced a result: the command line and the commit (and the one at the start, where the checkout
    changed during the run)."""
    now = commit()
    return {"command": " ".join(sys.argv), "commit": now, **({"commit_at_start": START} if START != now else {})}


START = commit()  # as the script starts: the code its runs began with


def save(name: str, result: dict) -> Path:
    """bench/results/NAME.json, with the command line and the commit that produced it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**provenance(), **result}, indent=2) + "\n")
    tmp.replace(path)
    return path


def fresh_inductor_cache() -> None:
    """Point torch.compile (inductor) at an empty cache folder, removed at exit: compile times
    are then what a first run pays, not hits left by an earlier run. inductor reads the
    variable when it first compiles, so call this before any torch.compile call."""
    folder = tempfile.mkdtemp(prefix="transferkit-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def finish(name: str, info: dict, rows: list[dict]) -> None:
    """The closing lines every script prints: the machine after the run, and where the JSON went."""
    info["machine_after"] = machine()
    print(f"\nafter: {describe(info['machine_after'])}")
    print(f"wrote {save(name, {**info, 'rows': rows})}")


def main_of(main) -> int:
    """A script's exit code: a bad argument or a missing input (TransferkitError) ends in one line, exit 2,
    as transferkit's own commands end."""
    from transferkit.errors import TransferkitError

    # the commands a benchmark starts run fresh (a user's exported TRANSFERKIT_WARM=1 made a "fresh" column
    # warm too); warm_commands turns warm on for the arm that measures it
    os.environ.pop("TRANSFERKIT_WARM", None)
    try:
        return main()
    except TransferkitError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2


class Clock:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t
