"""Image-folder archives (.tar, .tar.gz, .tar.bz2, .tar.xz, .zip) read into memory in one go: every
regular member's name, and the bytes of the members a caller keeps, with what the archive expands
to capped by this machine's memory (a few kilobytes of compressed zeros can claim gigabytes)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from transferkit.errors import TransferkitError

ZERO_BLOCK = bytes(512)
Members = list[tuple[str, "bytes | bytearray | None"]]


def memory_limit() -> int:
    """The most bytes an archive may expand to: a quarter of this machine's memory, as decoding its
    images holds about three copies of what it read."""
    import psutil

    return psutil.virtual_memory().total // 4


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
            name = name.decode("utf-8", "surrogateescape")
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


def _read(path: Path, keep: Callable[[str], bool], limit: int) -> Members:
    if path.stat().st_size > limit:
        raise _TooLarge
    raw = bytearray(path.read_bytes())
    if raw[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first record (a file; the directory of an empty one)
        try:  # an encrypted member; a compression method or zip version that zipfile lacks
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                return _last_of_each_name(_kept(((m.filename, lambda m=m: archive.open(m))
                                                 for m in archive.infolist() if not m.is_dir()), keep, limit))
        except (RuntimeError, NotImplementedError) as e:
            raise TransferkitError(f"{path} holds a member Python's zipfile cannot read ({e}): a password, a newer "
                                   f"zip version, or a compression such as Deflate64, which Windows uses for large "
                                   f"folders. Fix: re-create it with standard Deflate and no password (`zip -r`), or "
                                   f"as a .tar.gz.") from e
    # decompressed here, so that the tar's every header is checked: through tarfile, gzip also seeks
    # and inflates in small pieces
    # (bz2: "BZh", the block size, a block's or the stream end's magic, which no tar member's name starts with)
    for magic, opened in ((rb"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (rb"BZh[1-9](1AY&SY|\x17rE8P\x90)",
                          bz2.BZ2File), (rb"\xfd7zXZ\x00", lzma.LZMAFile)):
        if re.match(magic, raw):
            raw = _bounded(opened(io.BytesIO(raw)).read, 0, limit)
            break
    if (files := _tar_files(raw, keep)) is not None:
        return _last_of_each_name(files)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        # a hard link is a file stored once under two names (GNU tar writes one per inode it met before), and a
        # symbolic link one more name for a file: read from the file it names inside the archive (_member), as a
        # folder's reader follows a link
        by_name = {posixpath.normpath(m.name): m for m in tar.getmembers()}
        files = _kept(((m.name, lambda m=m: _member(tar, m, path, by_name)) for m in tar
                       if m.isfile() or m.islnk() or m.issym()), keep, limit)
        _check_ended(raw, tar.offset)  # where tarfile stopped: at a damaged header, it says nothing
    return _last_of_each_name(files)


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, by_name: dict[str, tarfile.TarInfo]):
    """The member's bytes, a link's from the file it names inside the archive (a hard link's name from the
    archive's top, a symbolic link's from its own folder), looked up by name: tarfile's own lookup scans every
    member for each link."""
    target = member
    for _ in range(32):  # links to links, never in a loop
        if not (target.islnk() or target.issym()):
            break
        name = target.linkname if target.islnk() else posixpath.join(posixpath.dirname(target.name), target.linkname)
        if (target := by_name.get(posixpath.normpath(name))) is None:
            break
    if target is None or not target.isfile():
        raise TransferkitError(f"{member.name} in {path} links to {member.linkname}, which is no file in the archive. "
                               f"Fix: make the archive with the files the links name (`tar -h` follows links).")
    return tar.extractfile(target)


def _last_of_each_name(files: Members) -> Members:
    """A name stored twice (`tar -r` or `zip -u` appends the new version) is the version extracting gives."""
    return list(dict(files).items())


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
    except _TooLarge:
        size = f"{limit / 1e9:.1f} GB" if limit >= 1e9 else f"{limit / 1e6:.1f} MB"
        raise TransferkitError(
            f"{path} expands to more than {size}, over a quarter of this machine's memory, into which archives are "
            f"read. Fix: extract it (`tar -xf` or `unzip`) and give that folder as the dataset: a folder is read "
            f"image by image, and only the classes asked for.") from None
    # KeyError, ValueError, struct.error: a zip directory that lies
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, KeyError,
            ValueError, struct.error) as e:
        raise TransferkitError(
            f"corrupt or unreadable archive {path} ({type(e).__name__}: {' '.join(str(e).split())}). Fix: copy the "
            f"archive into {path.parent}/ again (a .tar, .tar.gz, .tar.bz2, .tar.xz or .zip).") from e
