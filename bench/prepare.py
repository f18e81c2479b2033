"""Reading an image-folder archive, as `prepare` does: the archive's members listed by tarfile (the
baseline: a full TarInfo per member, built in Python) against the header scan `prepare` uses
(`transferkit/data/archives.py`), each alone and as part of `read_image_folder` (decompress, list,
decode every JPEG, stack), the two ways taking turns in one process.

    uv run python bench/prepare.py [--archive data/cifar10-jpeg.tar.gz] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import ROOT, describe, finish, machine, main_of, now, table

from transferkit.data import archives, sources


def by_tarfile(raw: bytearray, keep=None) -> None:
    """What `prepare` did before the header scan: every archive through tarfile."""
    return None


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, default=ROOT / "data" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--repeats", type=int, default=3, help="runs per way and part (median reported)")
    args = ap.parse_args(argv)
    if not args.archive.is_file():
        print(f"bench/prepare.py: {args.archive} not found. Fix: copy the CIFAR-10 image archive there "
              f"(or pass --archive PATH).")
        return 2
    info = {"when": now(), "machine": machine(), "archive": str(args.archive)}
    print(describe(info["machine"]), flush=True)
    scan = archives._tar_files
    ways = {"tarfile (baseline)": by_tarfile, "header scan": scan}
    parts = {"list members": lambda: archives.archive_files(args.archive),
             "read_image_folder": lambda: sources.read_image_folder(args.archive)}
    images = len(sources.read_image_folder(args.archive).train.labels)  # also warms the decoder once
    rows = []
    try:
        for part, fn in parts.items():
            times = {w: [] for w in ways}
            for _ in range(args.repeats):  # interleaved, so drift of the VM hits both ways alike
                for way, tar_files in ways.items():
                    archives._tar_files = tar_files
                    times[way].append(seconds(fn))
            rows += [{"part": part, "way": w, "seconds": statistics.median(t)} for w, t in times.items()]
            print(table(rows[-2:], COLUMNS), flush=True)
    finally:
        archives._tar_files = scan
    print(f"\n{args.archive.name} ({images:,} train images), {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats} (seconds):")
    print(table(rows, COLUMNS))
    finish("prepare", {**info, "repeats": args.repeats}, rows)
    return 0


COLUMNS = [("part", "part", "s"), ("way", "archive read by", "s"), ("seconds", "seconds", ".2f")]

if __name__ == "__main__":
    sys.exit(main_of(main))
