"""Which dataset a name or a path means, and reading it: the official CIFAR pickles (downloaded where asked),
or an image folder or archive (data/sources.py)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from transferkit.data.cifar import CIFAR, download_cifar, read_cifar_pickles
from transferkit.data.dataset import RawDataset
from transferkit.data.sources import read_image_folder
from transferkit.errors import TransferkitError


def _not_found(name: str, data_dir: Path, reason: str, download: bool = False) -> TransferkitError:
    from torchvision.datasets import CIFAR10, CIFAR100

    tgz = (CIFAR10 if name == "cifar10" else CIFAR100).filename  # torchvision reuses it where its md5 is the official
    unextracted = "" if not (data_dir / tgz).is_file() else (
        f"; {data_dir}/{tgz} is there, not the official file (its md5 differs): remove it before downloading again"
        if download else f"; {data_dir}/{tgz} is there, not extracted: `tar -xzf {tgz}` in {data_dir}/, or "
                         f"data.download=true, which extracts it where its md5 is the official one")
    return TransferkitError(f"{name.upper()} not found in {data_dir}/ and not downloadable ({reason}{unextracted}). "
                            f"Fix: provide "
                            f"it one of three ways: (1) the official python version: extract it to {data_dir}/"
                            f"{CIFAR[name][0]}/ (or run with network access and data.download=true); (2) an image-"
                            f"folder tree, .tar.gz or .zip (train/<class>/*, test/<class>/*) at {data_dir}/{name}-jpeg"
                            f".tar.gz (or .zip) or as the dataset path; (3) synthetic images: `experiment=smoke` (the "
                            f"pipeline; `transferkit scenarios` needs real images).")


def _copies(dataset: str, data_dir: Path) -> list[Path]:
    """Where a CIFAR name can be read from in data_dir, in the order it is looked for: the official release,
    then an image-folder archive or folder."""
    official = data_dir / CIFAR[dataset][0]
    jpeg = [data_dir / f"{dataset}-jpeg{ext}" for ext in (".tar.gz", ".zip", "")]
    return [c for c in (official, *jpeg) if (c.is_dir() if c == official else c.exists())]


def copies_of_one(names: list[str], found: list[Path], data_dir: Path) -> bool:
    """Whether two datasets, by name and where `locate` found them, hold the same images: one place, or a CIFAR
    name's official release and its image-folder copy beside it (whose JPEGs no pixel hash matches)."""
    if found[0].resolve() == found[1].resolve():
        return True
    return any(name in CIFAR and other.resolve() in {c.resolve() for c in _copies(name, data_dir)}
               for name, other in ((names[0], found[1]), (names[1], found[0])))


def dataset_location(dataset: str, data_dir: Path, root: Path | None = None) -> Path | None:
    """The folder or archive `load_dataset` reads `dataset` from (its name names the dataset; resolve it to
    compare two), None where it is not on disk (a CIFAR name to download, or a missing path). A relative
    path is read from `root` (default: here), else from data_dir."""
    if dataset in CIFAR:
        return next(iter(_copies(dataset, data_dir)), None)
    path = Path(dataset)
    if not path.is_absolute() and not (path := (root or Path()) / dataset).exists():
        path = data_dir / dataset
    return path if path.exists() else None


def locate(dataset: str, data_dir: Path, *, download: bool) -> Path:
    """Where `dataset` (a CIFAR name or a path) is read from, downloaded first where it must and may be: what
    prepare checks for both tasks before it decodes either."""
    if dataset in CIFAR:
        if found := _copies(dataset, data_dir):
            if len(found) > 1:  # an archive extracted beside itself, or edited: say which copy is read
                others = " and ".join(f.name + "/" * f.is_dir() for f in found[1:])
                print(f"prepare: {data_dir} holds {dataset} {len(found)} times: it reads {found[0].name}"
                      f"{'/' * found[0].is_dir()} (the official release first, then .tar.gz, .zip, a folder), not "
                      f"{others}. Fix: remove the copies you do not mean, or give the one you mean by its path as "
                      f"the dataset.", file=sys.stderr)
            return found[0]
        if not download:
            raise _not_found(dataset, data_dir, "data.download=false")
        made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]  # deepest first
        try:
            download_cifar(dataset, data_dir)
        except Exception as e:  # URLError, timeouts, DNS failures, checksum mismatch
            for folder in made:  # a mistyped paths.data_dir leaves no empty folders behind
                with contextlib.suppress(OSError):  # not empty, or another process's: kept
                    folder.rmdir()
            raise _not_found(dataset, data_dir, f"download failed: {type(e).__name__}: {e}", download=True) from e
        return data_dir / CIFAR[dataset][0]
    if (where := dataset_location(dataset, data_dir)) is None:
        raise TransferkitError(f"dataset '{dataset}' is neither 'cifar10', 'cifar100', 'synthetic' nor an existing "
                               f"image folder or archive. Fix: give one of those names or the path to a folder, "
                               f".tar.gz or .zip laid out as train/<class>/*, test/<class>/*.")
    if name := official_release(where):  # read as an image folder, it holds no images, and that error misleads
        fix = f"{'move' if where.is_dir() else 'extract'} it into paths.data_dir (as {data_dir}/{CIFAR[name][0]}/)"
        if where.is_dir() and where.name == CIFAR[name][0]:  # extracted already: where it lies can be the data folder
            fix += f", or set paths.data_dir={where.parent},"
        raise TransferkitError(f"{where} is the official {name.upper()} release, which is read by its name, not as an "
                               f"image folder. Fix: {fix} and set the dataset to {name}.")
    splits = [where.parent / s for s in ("train", "test")]
    if where.is_dir() and where.name in ("train", "test") and all(s.is_dir() for s in splits) and not any(
            (where / s).is_dir() for s in ("train", "test")):  # one split of a dataset, whose classes look like one
        raise TransferkitError(f"{where} is the {where.name}/ split of the dataset {where.parent}, which holds train/ "
                               f"and test/. Fix: give {where.parent} as the dataset.")
    return where


def read_dataset(dataset: str, where: Path, *, verify_checksums: bool, image_size: int,
                 wanted: set[str] | None) -> RawDataset:
    """The dataset `locate` found at `where`: the official pickles of a CIFAR name, else an image folder or archive."""
    if dataset in CIFAR and where.name == CIFAR[dataset][0]:
        return read_cifar_pickles(where, dataset, verify_checksums)
    return read_image_folder(where, image_size, wanted)


def load_dataset(dataset: str, data_dir: Path, *, download: bool, verify_checksums: bool,
                 image_size: int, wanted: set[str] | None) -> RawDataset:
    """Resolve a dataset name ('cifar10', 'cifar100') or a path to an image folder/archive, and read it."""
    return read_dataset(dataset, locate(dataset, data_dir, download=download), verify_checksums=verify_checksums,
                        image_size=image_size, wanted=wanted)


def official_release(path: Path) -> str | None:
    """The CIFAR name of an official release given as a path (its extracted folder, by its meta and first training
    file, where an image folder has train/ as a folder; or its download, by the name torchvision fetches it as)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        _, train, _, meta, *_ = CIFAR[name]
        if (path / meta).is_file() and (path / train[0]).is_file() if path.is_dir() else path.name == cls.filename:
            return name
    return None
