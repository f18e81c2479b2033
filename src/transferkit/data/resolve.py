"""Which dataset a name or a path means, and reading it: the official CIFAR pickles (downloaded where asked),
or an image folder or archive (data/sources.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from transferkit.data.cifar import CIFAR, download_cifar, read_cifar_pickles
from transferkit.data.dataset import RawDataset
from transferkit.data.sources import read_image_folder
from transferkit.errors import TransferkitError


def _not_found(name: str, data_dir: Path, reason: str) -> TransferkitError:
    return TransferkitError(f"{name.upper()} not found in {data_dir}/ and not downloadable ({reason}). Fix: provide "
                            f"it one of three ways: (1) the official python version: extract it to {data_dir}/"
                            f"{CIFAR[name][0]}/ (or run with network access and data.download=true); (2) an image-"
                            f"folder tree, .tar.gz or .zip (train/<class>/*, test/<class>/*) at {data_dir}/{name}-jpeg"
                            f".tar.gz (or .zip) or as the dataset path; (3) synthetic images: `experiment=smoke` (the "
                            f"pipeline; `transferkit scenarios` needs real images).")


def dataset_location(dataset: str, data_dir: Path, root: Path | None = None, skip_official: bool = False
                     ) -> Path | None:
    """The folder or archive `load_dataset` reads `dataset` from (its name names the dataset; resolve it to
    compare two), None where it is not on disk (a CIFAR name to download, or a missing path). A relative
    path is read from `root` (default: here), else from data_dir. `skip_official`: the image folder or archive
    a CIFAR name would be read from without the official release."""
    if dataset in CIFAR:
        official = data_dir / CIFAR[dataset][0]
        jpeg = [data_dir / f"{dataset}-jpeg{ext}" for ext in (".tar.gz", ".zip", "")]
        candidates = jpeg if skip_official else [official, *jpeg]
        return next((c for c in candidates if (c.is_dir() if c == official else c.exists())), None)
    path = Path(dataset)
    if not path.is_absolute() and not (path := (root or Path()) / dataset).exists():
        path = data_dir / dataset
    return path if path.exists() else None


def load_dataset(dataset: str, data_dir: Path, *, download: bool, verify_checksums: bool,
                 image_size: int, wanted: set[str] | None) -> RawDataset:
    """Resolve a dataset name ('cifar10', 'cifar100') or a path to an image folder/archive."""
    where = dataset_location(dataset, data_dir)
    if dataset in CIFAR:
        official = data_dir / CIFAR[dataset][0]
        if where is not None:
            if where == official and (other := dataset_location(dataset, data_dir, skip_official=True)):
                print(f"prepare: {data_dir} holds {dataset} twice, as {where.name}/ and as {other.name}: it reads "
                      f"{where.name}/ (the official release comes first), whose images differ from the archive's "
                      f"JPEGs. Fix: remove the one you do not mean.", file=sys.stderr)
            return (read_cifar_pickles(where, dataset, verify_checksums) if where == official
                    else read_image_folder(where, image_size, wanted))
        if not download:
            raise _not_found(dataset, data_dir, "data.download=false")
        try:
            download_cifar(dataset, data_dir)
        except Exception as e:  # URLError, timeouts, DNS failures, checksum mismatch
            raise _not_found(dataset, data_dir, f"download failed: {type(e).__name__}: {e}") from e
        return read_cifar_pickles(official, dataset, verify_checksums)
    if where is None:
        raise TransferkitError(f"dataset '{dataset}' is neither 'cifar10', 'cifar100', 'synthetic' nor an existing "
                               f"image folder or archive. Fix: give one of those names or the path to a folder, "
                               f".tar.gz or .zip laid out as train/<class>/*, test/<class>/*.")
    if name := official_release(where):  # read as an image folder, it holds no images, and that error misleads
        fix = f"{'move' if where.is_dir() else 'extract'} it into paths.data_dir (as {data_dir}/{CIFAR[name][0]}/)"
        if where.is_dir() and where.name == CIFAR[name][0]:  # extracted already: where it lies can be the data folder
            fix += f", or set paths.data_dir={where.parent},"
        raise TransferkitError(f"{where} is the official {name.upper()} release, which is read by its name, not as an "
                               f"image folder. Fix: {fix} and set the dataset to {name}.")
    return read_image_folder(where, image_size, wanted)


def official_release(path: Path) -> str | None:
    """The CIFAR name of an official release given as a path (its extracted folder, by its meta and first training
    file, where an image folder has train/ as a folder; or its download, by the name torchvision fetches it as)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        _, train, _, meta, *_ = CIFAR[name]
        if (path / meta).is_file() and (path / train[0]).is_file() if path.is_dir() else path.name == cls.filename:
            return name
    return None
