"""Image-folder datasets: trees or their .tar.gz / .zip archives of train/<class>/<image> and test/<class>/<image>,
decoded once into uint8 NCHW tensors, and the image files' decoding that predict shares."""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.data.archives import archive_files
from transferkit.data.memory import memory_limit
from transferkit.data.dataset import RawDataset, Split, class_name, layout_fix
from transferkit.errors import TransferkitError
from transferkit.progress import progress

# formats PIL registers a reader for but that hold no picture it decodes: page descriptions (PostScript: a program,
# which PIL runs Ghostscript on, so never read, whatever the file's name), stubs that only identify a file
# (scientific data, video), arrays (.h5, .fits), brushes and textures
NOT_PICTURES = {"EPS", "WMF", "BUFR", "GRIB", "HDF5", "FITS", "MPEG", "IPTC", "PCD", "GBR", "FTEX", "IM"}
# suffixes other files share: raw pixel dumps (.rgb, .rgba, .bw), disparity maps (.pfm)
SHARED_SUFFIXES = {".rgb", ".rgba", ".bw", ".pfm"}


@functools.cache
def picture_formats() -> tuple[str, ...]:
    """The formats PIL may read a file as. Computed on first use: registering every PIL format is start-up time a
    stage reading no image need not spend."""
    Image.init()
    return tuple(fmt for fmt in Image.OPEN if fmt not in NOT_PICTURES)


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Every file suffix PIL opens as a picture (.mpo, a JPEG with more frames, is read by the JPEG reader)."""
    return frozenset({ext for ext, fmt in Image.registered_extensions().items()
                      if fmt in picture_formats()} - SHARED_SUFFIXES | {".mpo"})


# the most pixels an image may have: PIL's own refusal point (twice the 89 million it warns above), checked
# here from the header alone, for every format; below it PIL's warning would print under the results
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# --------------------------------------------------------------------------- image folders
def _to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB as a viewer shows the file. 8-bit RGB without EXIF orientation or
    transparency (every CIFAR file) takes only the plain convert, so its pixels do not change."""
    try:  # phone cameras store pixels sideways plus a rotation tag
        ImageOps.exif_transpose(img, in_place=True)
    except (SyntaxError, ValueError, OSError, struct.error):  # a damaged EXIF block: the pixels as stored
        pass
    # convert() clips values above 255, so wider samples are scaled to 8 bits first: integer modes (I;16*, I) hold
    # 16-bit data (0..65535), and float mode F 0..1 (most writers) or 0..255 (PIL's own convert("F")), told by the
    # range of its finite samples (NaN, no value, shows black; infinities the ends of the range)
    if img.mode.startswith("I;16") or img.mode == "I":
        pixels = np.asarray(img)  # in its own width: int64 copies took 24 bytes a pixel, a large scan gigabytes
        if pixels.dtype.kind == "i":  # mode I (32-bit), I;16S: below 0 and past 16 bits clipped
            pixels = np.clip(pixels, 0, 65535)
        img = Image.fromarray((pixels >> 8).astype(np.uint8))
    elif img.mode == "F":
        floats = np.asarray(img)
        scale = 255 if floats.max(initial=0, where=np.isfinite(floats)) <= 1 else 1
        img = Image.fromarray(np.nan_to_num(floats * scale).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # transparent pixels show the white of the page a viewer draws them on, not the colour stored under them
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def decode_image(data: bytes, where: str, image_size: int, max_bytes: int | None = None) -> np.ndarray:
    """Any image file's bytes -> uint8 [3, S, S] RGB, resized (bilinear) when not S x S: EXIF
    orientation applied, 16-bit and float images scaled to 8 bits, transparency over white; one whose
    decoding would take more than `max_bytes` (default: memory_limit()) is refused."""
    try:
        img = Image.open(io.BytesIO(data), formats=picture_formats())  # PIL picks by content, not by suffix
        if img.width * img.height > MAX_PIXELS:
            raise Image.DecompressionBombError
        if min(img.size) >= 4 * image_size:  # a JPEG decodes at 1/2 to 1/8 scale, to twice S at least, as PIL's
            img.draft(None, (2 * image_size, 2 * image_size))  # thumbnail() does: a photo in a fraction of the time
        if (need := 16 * img.width * img.height) > (bound := max_bytes or memory_limit()):  # _to_rgb: 4 copies
            raise TransferkitError(f"image {where} ({img.width}x{img.height} pixels) takes about {need / 1e9:.1f} GB "
                                   f"to decode, more than the {bound / 1e9:.1f} GB one image may take here (its "
                                   f"share of a quarter of this process's memory). Fix: downscale it.")
        img = _to_rgb(img)
    except TransferkitError:
        raise
    except Image.DecompressionBombError as e:
        raise TransferkitError(f"image {where} has more than {MAX_PIXELS / 1e6:.0f} million pixels, more than PIL "
                               f"reads (a few kilobytes can declare billions). Fix: downscale it.") from e
    except Exception as e:  # a broken file raises what its reader hits (a PNG chunk SyntaxError, a GIF EOFError...)
        why = "no image format PIL reads" if isinstance(e, UnidentifiedImageError) else e  # its text: a buffer's id
        raise TransferkitError(f"corrupt image {where} ({why}). Fix: leave that file out, or replace it.") from e
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))  # a copy: PIL's own array is read-only


# the frame headers that hold a JPEG's size: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC)
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RST0-RST7, SOI, EOI: markers without a length


def jpeg_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header; None where the segments before it do not parse. By
    hand: PIL's header read builds an image object, about ten times the cost, once per file of a dataset."""
    at = 2
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _FRAME_MARKERS:
            return int.from_bytes(data[at + 7:at + 9], "big"), int.from_bytes(data[at + 5:at + 7], "big")
        if marker in _NO_LENGTH:  # libjpeg reads on after these two bytes: a length read here would skip to a decoy
            return None  # frame header, and the decoder would decode the real one, of any size, before a check
        at += 1 if marker == 0xFF else 2 + int.from_bytes(data[at + 2:at + 4], "big")  # 0xFF: a fill byte
    return None


def _decode_part(part: list[tuple[str, bytearray | Path]], image_size: int, limit: int) -> list[torch.Tensor]:
    """JPEGs whose header says S x S and that hold no EXIF block through torchvision's decoder (libjpeg-turbo: PIL's
    pixels, several times faster, other threads run), which decodes the whole part at full size before any check;
    other formats and sizes (through PIL's decompression-bomb limit), files with EXIF (whose orientation, damaged,
    the two readers read differently) or an XMP orientation, and any file it refuses through decode_image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    part = [(where, _file_bytes(data, limit) if isinstance(data, Path) else data) for where, data in part]
    jpeg = [i for i, (_, data) in enumerate(part) if data[:2] == b"\xff\xd8" and data.find(b"Exif\0\0", 0, 65536) < 0
            and data.find(b"tiff:Orientation", 0, 65536) < 0 and jpeg_size(data) == (image_size, image_size)]
    out: list[torch.Tensor | None] = [None] * len(part)
    try:  # torch reads a bytearray (what archives and folders give) in place
        decoded = decode_jpeg([torch.frombuffer(part[i][1], dtype=torch.uint8) for i in jpeg],
                              mode=ImageReadMode.RGB) if jpeg else []
    except RuntimeError:  # a corrupt file among them: decode_image names it
        decoded = []
    for i, img in zip(jpeg, decoded):
        out[i] = img if img.shape == (3, image_size, image_size) else None
    return [img if img is not None else torch.from_numpy(decode_image(data, where, image_size, limit))
            for img, (where, data) in zip(out, part)]


PART_FILES, PART_BYTES = 2000, 1 << 26  # a part's files are in memory together, and up to 16 parts decode at once


def _parts(files: list[tuple[str, bytearray | Path]]) -> list[list[tuple[str, bytearray | Path]]]:
    """`files` in runs of at most PART_FILES files and PART_BYTES bytes (a larger file alone): CIFAR's JPEGs fill
    a part by count, photos by bytes, so a folder of photos takes a few parts' bytes of memory, not its size."""
    parts, part, size = [], [], 0
    for where, data in files:
        try:
            n = data.stat().st_size if isinstance(data, Path) else len(data)
        except OSError:  # the read names the problem
            n = 0
        if part and (len(part) == PART_FILES or size + n > PART_BYTES):
            parts.append(part)
            part, size = [], 0
        part.append((where, data))
        size += n
    return [*parts, part]


def decode_images(files: list[tuple[str, bytearray | Path]], image_size: int, desc: str) -> torch.Tensor:
    """(name, bytes or the file holding them) pairs -> uint8 [N, 3, S, S], decoded in parallel threads, a file read
    as its part is decoded: a folder's images are never all in memory at once."""
    from concurrent.futures import ThreadPoolExecutor

    if not files:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    parts = _parts(files)
    workers = min(len(parts), os.cpu_count() or 1, 16)
    limit = memory_limit() // workers  # a file's bytes and an image's decoding, in each part decoded at once
    with ThreadPoolExecutor(workers) as pool:
        decoded = progress(pool.map(lambda p: _decode_part(p, image_size, limit), parts), desc, "part", len(parts))
        return torch.stack([img for chunk in decoded for img in chunk])


def is_image_file(parts: list[str] | tuple[str, ...]) -> bool:
    """Whether the file at these path parts is an image to read: an image suffix, and no hidden file or folder among
    them (macOS puts a `._` copy of every file into an archive made there; Jupyter leaves .ipynb_checkpoints): never
    a picture. (String operations, not pathlib: this runs once per archive member.)"""
    name = parts[-1]
    return ("." in name and "." + name.rsplit(".", 1)[1].lower() in image_suffixes()
            and not any(p.startswith(".") and p not in (".", "..") for p in parts))


def _parse_member(path: str, wanted: set[str] | None = None) -> tuple[str, str] | None:
    """'.../train/<class>/<file>' -> ('train', class); anything else -> None. An image in a folder inside a
    wanted class's folder ('train/<class>/<folder>/<file>') is refused: it would be left out without a word."""
    parts = path.replace("\\", "/").split("/")
    if len(parts) < 3 or not is_image_file(parts):  # a hidden folder anywhere in the dataset, as data/README says
        return None
    split, cls = parts[-3], class_name(parts[-2])
    if split in ("train", "test"):
        return split, cls
    if split.lower() in ("train", "test", "val", "valid", "validation") and (wanted is None or cls in wanted):
        raise TransferkitError(f"{path} lies in {split}/, which prepare does not read: it reads train/ and test/, and "
                               f"draws validation images from train/ (val_per_class). Fix: move {split}/'s images "
                               f"into {'train/ or out of the dataset' if split[0] in 'vV' else split.lower() + '/'}.")
    inner = [i for i, p in enumerate(parts[:-3]) if p in ("train", "test")]  # the split it may lie deeper in
    if inner and (wanted is None or class_name(parts[inner[-1] + 1]) in wanted):
        raise TransferkitError(f"{path} lies in a folder inside its class's folder, where no image is read (only "
                               f"<split>/<class>/<image>). Fix: move it up into the class's folder.")
    return None


def _unreadable(e: OSError) -> TransferkitError:
    """A file or folder of a dataset this user cannot read (copied from another user), or a disk error."""
    return TransferkitError(f"cannot read {e.filename} ({e.strerror or e}). Fix: make it readable, or remove it.")


def _file_bytes(path: Path, limit: int) -> bytearray:
    """A folder's file, refused before it is read where it is past the limit (no picture is that large)."""
    try:
        with path.open("rb") as f:
            if (size := os.fstat(f.fileno()).st_size) > limit:
                raise TransferkitError(f"{path} is {size / 1e9:.1f} GB, more than the {limit / 1e9:.1f} GB one file "
                                       f"may take here: no image to read. Fix: remove it from the dataset's folder.")
            data = bytearray(size)  # a bytearray, which torch decodes in place
            del data[f.readinto(data):]
            return data
    except OSError as e:
        raise _unreadable(e) from e


def _folder_files(path: Path) -> list[Path]:
    """Every file under `path`, links followed (as rglob does), sorted; an unreadable folder is an error
    rather than a class left out."""
    def refuse(e: OSError):
        raise _unreadable(e) from e

    files, ids = [], {}
    for root, _, names in os.walk(path, onerror=refuse, followlinks=True):
        here = os.stat(root)  # a link to a folder above it: os.walk reads it over and over, to its depth limit
        ids[Path(root)] = key = (here.st_dev, here.st_ino)
        if loop := next((p for p in Path(root).parents if ids.get(p) == key), None):
            raise TransferkitError(f"{root} is {loop} again (through a link): its images would be read over and over. "
                                   f"Fix: remove the link.")
        files += [Path(root) / name for name in names]
    return sorted(files)


def read_image_folder(path: Path, image_size: int = 32, wanted: set[str] | None = None) -> RawDataset:
    """Read `train/<class>/*` and `test/<class>/*` from a folder or a .tar(.gz) or .zip archive.

    Only classes in `wanted` are decoded (all if None): the rest of the archive is skipped.
    Files are sorted by path so the result does not depend on archive or filesystem order.
    """
    wanted = None if wanted is None else {class_name(c) for c in wanted}
    items: dict[tuple[str, str], list[tuple[str, bytearray | Path]]] = {}
    seen_classes: set[str] = set()
    roots: set[str] = set()  # the folder each image's train/ or test/ lies in: one dataset has one

    def root(name: str) -> str:
        parts = name.replace("\\", "/").rsplit("/", 3)
        return parts[0] if len(parts) == 4 else "."

    if path.is_dir():
        for f in _folder_files(path):
            key = _parse_member(str(f.relative_to(path)), wanted)
            if key and f.is_symlink() and not f.exists():  # as an archive's link to nothing is
                raise TransferkitError(f"{f} links to {os.readlink(f)}, which is no file. Fix: remove the link, or "
                                       f"put the image it meant in its place.")
            if key and f.is_file():
                seen_classes.add(key[1])
                roots.add(root(str(f.relative_to(path))))
                if wanted is None or key[1] in wanted:
                    items.setdefault(key, []).append((str(f), f))  # read as decoded
    else:
        def keep(name: str) -> bool:  # only the wanted classes' images are held in memory
            return (key := _parse_member(name, wanted)) is not None and (wanted is None or key[1] in wanted)

        for name, data in archive_files(path, keep):
            if key := _parse_member(name, wanted):
                seen_classes.add(key[1])
                roots.add(root(name))
                if data is not None:
                    items.setdefault(key, []).append((name, data))
    if len(roots) > 1:  # merged, a copy of an image could land in train and its twin in val
        a, b = sorted(roots)[:2]
        raise TransferkitError(f"{path} holds train/ and test/ in {a}/ and in {b}/: two datasets, or two copies of "
                               f"one. Fix: give the folder or archive of one dataset alone.")
    if not seen_classes:
        raise TransferkitError(f"no images found in {path} as train/<class>/<image> and test/<class>/<image>. "
                               f"Fix: {layout_fix(path)}.")
    classes = sorted(seen_classes)
    index = {c: i for i, c in enumerate(classes)}

    def split(name: str) -> Split:
        todo = [(where, data, c) for (s, c), files in sorted(items.items()) if s == name
                for where, data in sorted(files, key=lambda file: file[0])]
        images = decode_images([(where, data) for where, data, _ in todo], image_size, f"decoding {name} images")
        return Split(images, torch.tensor([index[c] for _, _, c in todo], dtype=torch.long))

    return RawDataset(path.name, classes, split("train"), split("test"))
