"""transferkit predict: classify image files with any model the project produced.

    transferkit predict MODEL IMAGE [IMAGE ...] [--json] [--top K]

MODEL: a model.pt written by any stage (pruned included), or a model.onnx written by
`transferkit export` or the quantize stage (class names are inside the file; for an ONNX file
without them, the export.json that `transferkit export` wrote beside it).
Both are read as data: neither can run code. A model.torchscript.pt is a program and is run only
with --trust-code. IMAGE: files PIL opens (PNG, JPEG, ...) or folders of them; each is converted to RGB
and resized (bilinear) to the model's input size, as the image-folder source does for training.
Prints one line per image: path, predicted class, its probability, and the top 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from transferkit.deploy.runtime import Classifier
from transferkit.errors import TransferkitError, one_line_errors, printable

BATCH = 256  # images a model runs on at once, at most
BATCH_BYTES = 64 * 2**20  # and their float32 pixels at most: 256 CIFAR images, 111 at 224 px, 5 at 1024 px


def batch_size(input_size: int) -> int:
    """How many images to decode and classify at once, so that memory stays flat however many are given."""
    return max(1, min(BATCH, BATCH_BYTES // (4 * 3 * input_size ** 2)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = one_line_errors(argparse.ArgumentParser(prog="transferkit predict", description=__doc__.split("\n\n")[0],
                                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("model", type=Path, help="model.pt (any stage), model.onnx or model.torchscript.pt")
    p.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.add_argument("--top", type=int, default=3, help="how many classes to list per image (default 3)")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a TorchScript model file, which is a program: only for files you made yourself")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be >= 1")
    from transferkit.data.sources import is_image_file

    if is_image_file((args.model.name,)):  # an image where the model goes: the arguments swapped, most likely
        raise TransferkitError(f"{args.model} is an image, where predict takes the model first. Fix: `transferkit "
                               f"predict MODEL IMAGE_OR_FOLDER...` (MODEL: a model.pt, model.onnx or "
                               f"model.torchscript.pt).")
    return args


def expand(paths: list[Path]) -> list[Path]:
    """Folders -> the image files inside them (sorted, recursive, links to folders not followed); files stay as
    given. A folder this user cannot list is an error, not its images left out."""
    import os

    from transferkit.data.sources import is_image_file

    def refuse(e: OSError):
        raise TransferkitError(f"cannot read folder {e.filename} ({e.strerror or e}). Fix: make it readable, or "
                               f"pass the images outside it.") from e

    out = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for root, _, names in os.walk(p, onerror=refuse) for f in map(Path(root).joinpath, names)
                           if is_image_file(f.relative_to(p).parts) and (f.is_file() or f.is_symlink()))
            if not found:
                raise TransferkitError(f"folder {p} holds no image files (none in a format PIL reads, such as "
                                       f".jpg or .png). "
                                       f"Fix: pass image files or a folder that contains some.")
            out += found
        else:
            out.append(p)
    return out


def decode_images(paths: list[Path], size: int) -> tuple[np.ndarray, list[str]]:
    """Image files (anything PIL opens) -> uint8 [N, 3, size, size] of those that read, resized (bilinear) exactly
    as the image-folder source does, and what is wrong with each file that does not."""
    from transferkit.data.memory import memory_limit
    from transferkit.data.sources import decode_image

    out, bad, limit = [], [], memory_limit()
    for p in paths:
        name = printable(str(p))  # one line per file in the error: a name cannot forge another
        if p.exists() and not (p.is_file() or p.is_dir()):  # a device or a pipe: reading it may never end
            bad.append(f"{name} (not a file)")
            continue
        try:
            if (n := p.stat().st_size) > limit:  # a disk image or a video renamed: refused before it is read
                bad.append(f"{name} ({n / 1e9:.1f} GB, more than a quarter of the memory this process may use: "
                           f"no image)")
                continue
            out.append(decode_image(p.read_bytes(), name, size, limit))
        except FileNotFoundError:  # a link to nothing in a folder too, as prepare refuses it
            bad.append(f"{name} ({'a link to nothing' if p.is_symlink() else 'no such file'})")
        except IsADirectoryError:
            bad.append(f"{name} (a folder)")
        except OSError as e:
            bad.append(f"{name} ({e.strerror or e})")
        except TransferkitError as e:  # decode_image's own words, which name the file; its fix joins them
            problem, _, fix = str(e).partition(" Fix: ")
            bad.append(f"{problem.rstrip('.')}: {fix.rstrip('.')}" if fix else problem.rstrip("."))
    return (np.stack(out) if out else np.zeros((0, 3, size, size), np.uint8)), bad


def unreadable(bad: list[str], total: int) -> TransferkitError:
    """One error naming the files `decode_images` could not read, of `total`: the first few, and how many more (a
    folder of thousands of text files made a line of thousands of names)."""
    more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    return TransferkitError(f"cannot read {len(bad)} of {total} image(s): {'; '.join(bad[:SHOWN])}{more}. "
                            f"Fix: mend or leave out these files, as each note says: predict reads image files this "
                            f"user may read and PIL can open (PNG, JPEG, BMP, ...).")


SHOWN = 5  # unreadable files an error names


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def predict(model: str | Path | Classifier, images: list[str | Path], top: int = 3,
            trust_code: bool = False) -> list[dict]:
    """[{path, class, probability, top: [{class, probability}, ...]}] for each image, in order."""
    clf = model if isinstance(model, Classifier) else Classifier(model, trust_code=trust_code)
    paths = expand([Path(p) for p in images])
    logits, bad, step = [], [], batch_size(clf.input_size)
    if fixed := clf.fixed_batch:  # a file fixed at N images is padded to N: whole runs of N
        step = fixed * max(1, step // fixed)
    for i in range(0, len(paths), step):
        pixels, problems = decode_images(paths[i:i + step], clf.input_size)
        bad += problems
        if not bad:  # after a file fails, the rest are only read, so that one error names every file that fails
            logits.append(clf(pixels.astype(np.float32) / 255))
    if bad:
        raise unreadable(bad, len(paths))
    logits = np.concatenate(logits) if logits else np.zeros((0, len(clf.classes)), np.float32)
    clf.check_finite(logits, [str(p) for p in paths])
    probs = softmax(logits)
    results = []
    for path, p in zip(paths, probs):
        order = np.argsort(-p, kind="stable")[:top]
        results.append({"path": str(path), "class": clf.classes[order[0]], "probability": float(p[order[0]]),
                        "top": [{"class": clf.classes[i], "probability": float(p[i])} for i in order]})
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    results = predict(args.model, args.images, args.top, args.trust_code)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        shown = [printable(r["path"]) for r in results]  # a file name cannot forge a line (class names are checked)
        width, cls = max(map(len, shown)), max(len(r["class"]) for r in results)
        for path, r in zip(shown, results):
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            print(f"{path:<{width}}  {r['class']:<{cls}}  {r['probability']:.3f}  top-{len(r['top'])}: {top}")
    return 0
