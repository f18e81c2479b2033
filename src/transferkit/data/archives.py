"""Image-folder archives (.tar, .tar.gz, .tar.bz2, .tar.xz, .zip) read into memory in one go: every
regular member's name, and the bytes of the members a caller keeps, with what the archive expands
to capped by the memory this process may use (a few kilobytes of compressed zeros can claim gigabytes)."""

from __future__ import annotations

import bisect
import bz2
import contextlib
import gzip
import io
import lzma
import posixpath
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from transferkit.data.memory import memory_limit
from transferkit.errors import TransferkitError

ZERO_BLOCK = bytes(512)
PATH_MAX = 4096  # the longest path Linux resolves
Members = list[tuple[str, "bytes | bytearray | None"]]


class _TooLarge(Exception):
    """The archive expands past memory_limit()."""


CHUNK = 1 << 24  # what one read asks for: a reader allocates the size asked up front, whatever it then finds


def _bounded(read: Callable[[int], bytes], total: int, limit: int) -> bytearray:
    """Everything `read` gives, in chunks, refused as soon as it passes what is left of the limit."""
    data = bytearray()
    while chunk := read(min(CHUNK, limit - total - len(data) + 1)):
        data += chunk
        if total + len(data) > limit:
            raise _TooLarge
    return data


def _tar_files(raw: bytearray, keep: Callable[[str], bool] = lambda name: True) -> Members | None:
    """The regular files of an uncompressed tar, as (name, bytes), read from its 512-byte headers;
    None where it holds anything else (pax records, long names, links; no tar), which tarfile then
    reads. A damaged header after the first raises tarfile.ReadError, as do members after a zeroed
    header: tarfile would end the archive there without a word. By hand because tarfile builds a full
    TarInfo in Python for every member, which costs more than decoding a small JPEG."""
    files, offsets, checksums, off, plain = [], [], [], 0, True
    while off + 512 <= len(raw) and (header := raw[off:off + 512]) != ZERO_BLOCK:  # two of them end a tar
        try:
            size, checksum = int(header[124:136].strip(b"\0 ") or b"0", 8), int(header[148:156].strip(b"\0 "), 8)
        except ValueError:
            size = checksum = -1
        offsets.append(off)
        checksums.append(checksum)
        kind, start = header[156:157], off + 512
        if size < 0 or kind not in (b"0", b"\0", b"5") or start + size > len(raw):
            plain = False  # a header this scan does not read, or a damaged one: its checksum tells
            break
        name = header[:100].partition(b"\0")[0]
        if header[257:263] == b"ustar\0" and header[345]:  # POSIX ustar: a long path's folders
            name = header[345:500].partition(b"\0")[0] + b"/" + name
        if kind != b"5":
            name = _normal(name.decode("utf-8", "surrogateescape"))
            files.append((name, raw[start:start + size] if keep(name) else None))
        off = start + -(-size // 512) * 512
    ok = _checksums_hold(raw, offsets, checksums)
    if not ok.all():
        if not ok[0]:  # no tar at all, or a compressed one: tarfile decides
            return None
        raise tarfile.ReadError(f"the header at byte {offsets[int(np.argmin(ok))]} is damaged (wrong checksum)")
    if plain and offsets:
        _check_ended(raw, off)
    return files if plain and offsets else None


def _check_ended(raw: bytearray, end: int) -> None:
    """The archive ends at `end`, where a reader stopped, with tar's end marker (a zero block) and zeros after
    it: not more members after a damaged or zeroed header, nor nothing at all (a copy cut short between two
    members, which tarfile reads as a whole archive)."""
    if len(raw) < end + 512:
        raise tarfile.ReadError(f"the archive stops at byte {len(raw)} without tar's end marker: it was cut short")
    if any(raw[end:]):
        raise tarfile.ReadError(f"the header at byte {end} is damaged: the archive goes on after it")


def _checksums_hold(raw: bytearray, offsets: list[int], checksums: list[int]) -> np.ndarray:
    """Whether each header holds its checksum: the sum of its bytes, its own 8 counted as spaces,
    unsigned or (as some old tars wrote it, and tarfile accepts) signed."""
    blocks = np.frombuffer(raw, np.uint8, count=len(raw) // 512 * 512).reshape(-1, 512)
    headers = blocks[np.asarray(offsets, dtype=np.int64) // 512].astype(np.int64)
    headers[:, 148:156] = ord(" ")
    unsigned = headers.sum(1)
    return (unsigned == checksums) | (unsigned - 256 * (headers >= 128).sum(1) == checksums)


# formats read as archives elsewhere, which would otherwise read here as a corrupt tar
UNSUPPORTED = {b"\x28\xb5\x2f\xfd": "Zstandard (.zst)", b"7z\xbc\xaf\x27\x1c": "7-Zip (.7z)", b"Rar!\x1a\x07": "RAR",
               b"\x04\x22\x4d\x18": "LZ4 (.lz4)", b"LZIP\x01": "lzip (.lz)", b"\x1f\x9d": "compress (.Z)"}


def _read(path: Path, keep: Callable[[str], bool], limit: int) -> Members:
    if not stat.S_ISREG((info := path.stat()).st_mode):  # /dev/zero would be read without end, a pipe wait for ever
        raise TransferkitError(f"{path} is no file but a device or a pipe. Fix: give a folder or an archive file of "
                               f"train/<class>/*, test/<class>/* as the dataset.")
    if info.st_size > limit:
        raise _TooLarge
    with path.open("rb") as f:  # in chunks: a file that grows as it is read (or says 0 bytes, as /proc's) is bounded
        raw = _bounded(f.read, 0, limit)
    if raw[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first record (a file; the directory of an empty one)
        try:  # an encrypted member; a compression method or zip version that zipfile lacks
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                return _zip_files(archive, path, keep, limit)
        except (RuntimeError, NotImplementedError) as e:
            raise TransferkitError(f"{path} holds a member Python's zipfile cannot read ({e}): a password, a newer "
                                   f"zip version, or a compression such as Deflate64, which Windows uses for large "
                                   f"folders. Fix: re-create it with standard Deflate and no password (`zip -r`), or "
                                   f"as a .tar.gz.") from e
    if kind := next((kind for magic, kind in UNSUPPORTED.items() if raw.startswith(magic)), None):
        raise TransferkitError(f"{path} is compressed as {kind}, which transferkit does not read. Fix: extract it and "
                               f"give that folder, or re-create it as a .tar.gz or .zip.")
    # decompressed here, so that the tar's every header is checked: through tarfile, gzip also seeks
    # and inflates in small pieces
    # (bz2: "BZh", the block size, a block's or the stream end's magic, which no tar member's name starts with)
    for magic, opened in ((rb"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (rb"BZh[1-9](1AY&SY|\x17rE8P\x90)",
                          bz2.BZ2File), (rb"\xfd7zXZ\x00", lzma.LZMAFile)):
        if re.match(magic, raw):
            raw = _bounded(opened(io.BytesIO(raw)).read, 0, limit)
            break
    if (files := _tar_files(raw, keep)) is not None:
        return list(dict(files).items())  # a name stored twice (`tar -r`): its last version
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        regular, links = {}, {}
        for m in tar:
            if m.isfile() or m.islnk() or m.issym():
                name = _normal(m.name)
                regular.pop(name, None), links.pop(name, None)  # a name stored twice: its last version
                if m.isfile():
                    regular[name] = lambda m=m: tar.extractfile(m)
                else:  # a hard link names its file from the archive's top, a symbolic link from its own folder
                    links[name] = (m.linkname, _normal(m.linkname) if m.islnk() else
                                   posixpath.join(posixpath.dirname(name), m.linkname))
        files = _kept(_linked(regular, links, path, keep), keep, limit)
        _check_ended(raw, tar.offset)  # where tarfile stopped: at a damaged header, it says nothing
    return files


def _normal(name: str) -> str:
    """A member's path as extracting places it: `./train/a.png`, `/train/a.png` and `train//a.png` are one file."""
    return posixpath.normpath("/" + name.replace("\\", "/")).lstrip("/")


def _zip_name(info: zipfile.ZipInfo) -> str:
    """A member's name, read as UTF-8 where the zip's flag says cp437 but the name is UTF-8 (Info-ZIP's zip, which
    adds the name in UTF-8 in a field of its own, 0x7075; archivers that write UTF-8 without the flag)."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        stored = info.filename.encode("cp437")  # the bytes zipfile decoded as cp437
    except UnicodeEncodeError:
        return info.filename
    extra = info.extra
    while len(extra) >= 4:
        tag, size = struct.unpack("<HH", extra[:4])
        field, extra = extra[4:4 + size], extra[4 + size:]
        # version 1, then the CRC-32 of the name it stands for: a stale field (the name renamed since) is not read
        if tag == 0x7075 and size >= 5 and field[0] == 1 and struct.unpack("<I", field[1:5])[0] == zlib.crc32(stored):
            with contextlib.suppress(UnicodeDecodeError):
                return field[5:].decode("utf-8")
    try:
        return stored.decode("utf-8")
    except UnicodeDecodeError:  # a name in a local code page: cp437, as zipfile read it
        return info.filename


def _zip_files(archive: zipfile.ZipFile, path: Path, keep: Callable[[str], bool], limit: int) -> Members:
    regular, links, held = {}, {}, 0
    for m in archive.infolist():
        if not m.is_dir():
            name = _normal(_zip_name(m))
            regular.pop(name, None), links.pop(name, None)  # a name stored twice (`zip -u`): its last version
            if m.create_system == 3 and stat.S_ISLNK(m.external_attr >> 16):  # `zip -y` stores a link's target
                with archive.open(m) as member:  # a target past PATH_MAX leads nowhere: no more is read
                    target = member.read(PATH_MAX + 1).decode("utf-8", "surrogateescape")
                links[name] = (target, posixpath.join(posixpath.dirname(name), target))
                if (held := held + len(target)) > limit:
                    raise _TooLarge
            else:
                regular[name] = lambda m=m: archive.open(m)
    return _kept(_linked(regular, links, path, keep), keep, limit)


def _resolver(regular: dict, links: dict[str, tuple[str, str]], path: Path) -> Callable[[str], str | None]:
    """name -> the file or folder inside the archive it is, the links on its way followed from its first folder on,
    as the filesystem follows them; None where it leads outside the archive (an absolute link, one above its top),
    round in a loop or past PATH_MAX. A name's folders are looked up only at the depths links sit at, and no more
    than a budget that ordinary links never use up: a few hundred bytes of hostile links cannot keep it busy."""
    depths, budget = sorted({name.count("/") + 1 for name in links}), [64 * len(links) + 100_000]

    def resolve(name: str) -> str | None:
        for _ in range(32):  # links to links, never in a loop
            name = posixpath.normpath(name)
            if len(name) > PATH_MAX or name.startswith(("/", "../")) or name == "..":
                return None
            if name in regular:
                return name
            parts = name.split("/")
            budget[0] -= len(depths)
            if budget[0] < 0:
                raise TransferkitError(f"{path} holds links too many or too deep to follow. Fix: extract it and give "
                                       f"that folder, or make it with `tar -h`, which stores files, not links.")
            head = next((d for d in depths if d <= len(parts) and "/".join(parts[:d]) in links), None)
            if head is None:
                return name
            name = posixpath.join(links["/".join(parts[:head])][1], *parts[head:])
        return None
    return resolve


def _inside(names: list[str], folder: str) -> list[str]:
    """The sorted `names` that lie inside `folder`: a range of them, found by bisection, not a scan."""
    return names[bisect.bisect_left(names, folder + "/"):bisect.bisect_left(names, folder + "0")]  # "0" follows "/"


def _stands_for_a_kept_folder(keep: Callable[[str], bool], link: str) -> bool:
    try:  # an image in the folder the link would be is read where that folder is a wanted class's
        return keep(f"{link}/0.png")
    except TransferkitError:  # the link is a file inside a class's folder (train/cat/notes.txt), not a folder
        return False


def _linked(regular: dict, links: dict[str, tuple[str, str]], path: Path, keep: Callable[[str], bool]):
    """(name, opener) for every file, and for every file a link gives a name, as a folder's reader follows a link:
    a link to a file is that file, a link to a folder holds that folder's files and the files its links name. A
    link that names nothing in the archive is an error where a file it stood for would be read."""
    resolve, names, link_names = _resolver(regular, links, path), sorted(regular), sorted(links)
    targets = {link: resolve(at) for link, (_, at) in links.items()}
    files = list(regular.items()) + [(link, regular[t]) for link, t in targets.items() if t in regular]
    for link, target in targets.items():
        if target in regular:
            continue
        under = [] if target is None else [(link + n[len(target):], regular[n]) for n in _inside(names, target)] + [
            (link + n[len(target):], regular[targets[n]]) for n in _inside(link_names, target) if targets[n] in regular]
        if under:
            files += under
            if len(files) > 8 * len(regular) + 1000:  # links to folders above themselves multiply every file
                raise TransferkitError(f"{path} holds links to folders that name its files more than 8 times over "
                                       f"(a link to a folder above itself). Fix: extract it and give that folder.")
        elif keep(link) or _stands_for_a_kept_folder(keep, link):
            written = links[link][0]
            raise TransferkitError(
                f"{link} in {path} links to {written[:200]}{'...' if len(written) > 200 else ''}, which is no file or "
                f"folder in the archive. Fix: make the archive with the files the links name (`tar -h` follows "
                f"links; `zip` does unless given -y).")
    return files


def _kept(members, keep: Callable[[str], bool], limit: int) -> Members:
    """(name, a function opening the member) pairs -> (name, bytes), the bytes read for the names kept only,
    together within the limit."""
    files, total = [], 0
    for name, opened in members:
        data = None
        if keep(name):
            with opened() as member:
                data = _bounded(member.read, total, limit)
            total += len(data)
        files.append((name, data))
    return files


def archive_files(path: Path, keep: Callable[[str], bool] = lambda name: True) -> Members:
    """Every regular file of the archive at `path` as (name, bytes), the bytes None for a name `keep` refuses."""
    limit = memory_limit()
    try:
        return _read(path, keep, limit)
    except (_TooLarge, MemoryError) as e:  # MemoryError: under a process limit (ulimit -v) below the cap
        size = f"{limit / 1e9:.1f} GB" if limit >= 1e9 else f"{limit / 1e6:.1f} MB"
        what = ("does not fit in the memory this process may use" if isinstance(e, MemoryError) else
                f"expands to more than {size}, over a quarter of the memory this process may use")
        raise TransferkitError(
            f"{path} {what}, into which archives are read. Fix: extract it (`tar -xf` or `unzip`) and give that "
            f"folder as the dataset: a folder is read image by image, and only the classes asked for.") from None
    # KeyError, ValueError, struct.error: a zip directory that lies
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, KeyError,
            ValueError, struct.error) as e:
        raise TransferkitError(  # or no archive at all: a .csv, one image, an empty file
            f"corrupt or unreadable archive {path} ({type(e).__name__}: {' '.join(str(e).split())}). Fix: copy it into "
            f"{path.parent}/ again (a .tar, .tar.gz, .tar.bz2, .tar.xz or .zip), or give a folder or archive of "
            f"train/<class>/*, test/<class>/* as the dataset.") from e
