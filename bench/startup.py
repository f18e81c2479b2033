"""Process start-up: what every stage pays before it does any work.

`dvc repro` runs each stage as its own `transferkit STAGE` process, and the tests start many
more, so importing torch, Lightning and torchvision is paid again and again. This times a
fresh `python -c "import M"` for the modules a training stage imports, two ways, in the same
run:

- installed bytecode: the .pyc files `uv sync --compile-bytecode` writes for every package
  (the README's setup command and .ci/run use it);
- compiled from source (the baseline): PYTHONPYCACHEPREFIX points at a folder holding only the
  standard library's .pyc files (which the interpreter ships), so Python compiles every installed
  package's module, as it does on each start when it may not write bytecode
  (PYTHONDONTWRITEBYTECODE=1, as on this project's machines; a read-only venv) and the installer
  wrote none.

Both ways run with PYTHONDONTWRITEBYTECODE=1, so no run leaves files that change the next.

    uv run python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from _common import describe, finish, machine, main_of, now, table

MODULES = ["torch", "torchvision", "pytorch_lightning", "transferkit.stages.pretrain"]


def seed_stdlib_bytecode(prefix: Path) -> int:
    """Copy the standard library's .pyc files to where PYTHONPYCACHEPREFIX=prefix looks for them (the
    source's folder, under prefix, without __pycache__): the prefix hides every __pycache__ folder."""
    import shutil

    stdlib, copied = Path(sysconfig.get_paths()["stdlib"]).resolve(), 0
    for pyc in stdlib.rglob("__pycache__/*.pyc"):
        if "site-packages" in pyc.parts:
            continue
        target = prefix / pyc.parent.parent.relative_to("/") / pyc.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pyc, target)
        copied += 1
    return copied


def import_seconds(module: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per module and way (median reported)")
    args = ap.parse_args(argv)

    site = Path(sysconfig.get_paths()["purelib"])
    pyc = sum(1 for _ in (site / "torch").rglob("*.pyc"))
    info = {"when": now(), "machine": machine(), "torch_pyc_files": pyc}
    print(f"{describe(info['machine'])}; {pyc} .pyc files under {site / 'torch'}", flush=True)
    if not pyc:
        print("no installed bytecode: both ways compile from source. Run `uv sync --compile-bytecode` "
              "to measure the difference.", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="transferkit-nopyc-") as stdlib_only:
        info["stdlib_pyc_files"] = seed_stdlib_bytecode(Path(stdlib_only))
        base = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        base.pop("PYTHONPYCACHEPREFIX", None)
        ways = {"bytecode": base, "source": {**base, "PYTHONPYCACHEPREFIX": stdlib_only}}
        for module in MODULES:
            times = {w: [] for w in ways}
            for _ in range(args.repeats):  # interleaved, so drift of the VM hits both ways alike
                for way, env in ways.items():
                    times[way].append(import_seconds(module, env))
            row = {"module": module, **{w: statistics.median(t) for w, t in times.items()}}
            row["speedup"] = row["source"] / row["bytecode"]
            rows.append(row)
            print(table(rows[-1:], COLUMNS), flush=True)

    print(f"\nfresh-process `import M`, median of {args.repeats} (seconds):")
    print(table(rows, COLUMNS))
    finish("startup", {**info, "repeats": args.repeats}, rows)
    return 0


COLUMNS = [("module", "import", "s"), ("source", "compiled from source s", ".2f"),
           ("bytecode", "installed bytecode s", ".2f"), ("speedup", "speed-up", ".1f")]

if __name__ == "__main__":
    sys.exit(main_of(main))
