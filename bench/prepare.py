"""Reading an image-folder archive, as `prepare` does: the archive's members listed by tarfile (the
baseline: a full TarInfo per member, built in Python) against the header scan `prepare` uses
(`transferkit/data/archives.py`), each alone and as part of `read_image_folder` (decompress, list,
decode every JPEG, stack), the two ways taking turns in one process.

With --photos: decoding photos larger than the image size (synthetic JPEGs: a gradient with a little
noise, quality 90) to 32 x 32 as `decode_image` does (the decoder scales by 1/2 to 1/8 on the way)
against a full-size decode and the same resize (the baseline), taking turns; milliseconds per image
and the largest pixel difference between the two.

    uv run python bench/prepare.py [--archive data/cifar10-jpeg.tar.gz] [--repeats 3] [--photos]
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


def photo(width: int, height: int, rng) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photos(repeats: int) -> list[dict]:
    """decode_image against a full-size decode and resize, on photos of three sizes."""
    import io

    import numpy as np
    from PIL import Image

    def full_size(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BILINEAR)
        return np.asarray(img).transpose(2, 0, 1)

    ways = {"full-size decode, then resize (baseline)": full_size,
            "decode_image": lambda data: sources.decode_image(data, "photo", 32)}
    rng, rows = np.random.default_rng(0), []
    for width, height in ((640, 480), (1600, 1200), (4000, 3000)):
        files = [photo(width, height, rng) for _ in range(4)]
        for decode in ways.values():  # untimed, so first-call costs (PIL plugins, the memory limit) fall on neither way
            decode(files[0])
        times = {w: [] for w in ways}
        for _ in range(repeats):
            for way, decode in ways.items():
                times[way].append(seconds(lambda: [decode(f) for f in files]) / len(files))
        worst = max(int(np.abs(full_size(f).astype(int) - ways["decode_image"](f).astype(int)).max()) for f in files)
        rows += [{"part": f"{width} x {height}", "way": w, "seconds": 1000 * statistics.median(t),
                  "diff": worst if w == "decode_image" else None} for w, t in times.items()]
        print(table(rows[-2:], PHOTO_COLUMNS), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, default=ROOT / "data" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--repeats", type=int, default=3, help="runs per way and part (median reported)")
    ap.add_argument("--photos", action="store_true", help="decoding large photos instead of the archive")
    args = ap.parse_args(argv)
    if args.photos:
        info = {"when": now(), "machine": machine()}
        print(describe(info["machine"]), flush=True)
        rows = photos(args.repeats)
        print(f"\nphotos to 32 x 32, {torch.get_num_threads()} torch threads, median of {args.repeats} (ms per image; "
              f"largest difference of a pixel between the two ways, of 255):")
        print(table(rows, PHOTO_COLUMNS))
        finish("prepare_photos", {**info, "repeats": args.repeats}, rows)
        return 0
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
PHOTO_COLUMNS = [("part", "photo", "s"), ("way", "decoded by", "s"), ("seconds", "ms per image", ".1f"),
                 ("diff", "largest pixel difference", "d")]

if __name__ == "__main__":
    sys.exit(main_of(main))
