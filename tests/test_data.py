"""Data layer: raw sources (official CIFAR pickles, image folders/archives, synthetic),
task selection, batched augmentation and atomic file writes. Tiny fake datasets only;
no test ever downloads anything (download=False, or download_cifar is replaced)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import shutil
import stat
import struct
import zlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CIFAR10_CLASSES, random_images, refuse_listing, write_cifar_pickles, write_image_folder
from transferkit.data import archives, resolve, sources
from transferkit.data.augment import augment, draw_flips, draw_shifts, flip, translate
from transferkit.data.loader import DeviceBatches
from transferkit.data.cifar import read_cifar_pickles
from transferkit.data.dataset import RawDataset, Split
from transferkit.data.resolve import load_dataset
from transferkit.data.sources import read_image_folder
from transferkit.data.synthetic import make_synthetic
from transferkit.data.tasks import select_task, task_summary
from transferkit.errors import TransferkitError
from transferkit.io import atomic_path, load_torch, save_json, save_torch

CIFAR100_SOME = ["beaver", "dolphin", "otter"]


def _load(dataset, data_dir, **kw):
    args = dict(download=False, verify_checksums=False, image_size=32, wanted=None)
    args.update(kw)
    return load_dataset(dataset, data_dir, **args)


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    """Any attempt to download in this file is a test failure, never a network access."""
    def refuse(*a, **k):
        raise AssertionError("a test tried to download CIFAR")

    monkeypatch.setattr(resolve, "download_cifar", refuse)


# ============================================================== official CIFAR pickles
def test_cifar10_pickles_are_read(tmp_path):
    write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=2)
    raw = _load("cifar10", tmp_path)
    assert raw.name == "cifar10"
    assert raw.classes == CIFAR10_CLASSES
    assert raw.train.images.shape == (50, 3, 32, 32) and raw.train.images.dtype == torch.uint8
    assert raw.test.images.shape == (20, 3, 32, 32) and raw.test.images.dtype == torch.uint8
    assert raw.train.labels.dtype == torch.int64 and raw.test.labels.dtype == torch.int64
    assert torch.bincount(raw.train.labels, minlength=10).tolist() == [5] * 10
    assert torch.bincount(raw.test.labels, minlength=10).tolist() == [2] * 10
    # the 5 training batches are concatenated in order; pixels keep the CHW layout of the file
    assert raw.train.labels[:10].tolist() == list(range(10))
    first_batch = random_images(10, seed=1)  # data_batch_1, HWC
    assert torch.equal(raw.train.images[:10], torch.from_numpy(first_batch.transpose(0, 3, 1, 2).copy()))
    test_batch = random_images(20, seed=99)
    assert torch.equal(raw.test.images, torch.from_numpy(test_batch.transpose(0, 3, 1, 2).copy()))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_the_official_release_given_as_a_dataset_path_names_the_fix(tmp_path, name):
    """Its folder or its download as data.X.dataset went to the image-folder reader, whose 'no images found ...
    arrange the images in that layout' sent the user to rearrange a dataset prepare reads by its name."""
    from torchvision.datasets import CIFAR10, CIFAR100

    folder = write_cifar_pickles(tmp_path, name, CIFAR10_CLASSES if name == "cifar10" else CIFAR100_SOME, 5, 2)
    download = tmp_path / (CIFAR10 if name == "cifar10" else CIFAR100).filename
    download.write_bytes(b"the official archive")
    for path in (folder, download):
        with pytest.raises(TransferkitError, match=rf"{path} is the official {name.upper()} release, which is read "
                                                   rf"by its name.*Fix: {'move' if path == folder else 'extract'} "
                                                   rf"it into paths.data_dir \(as {tmp_path / 'data'}/{folder.name}/\)"
                                                   rf"{f', or set paths.data_dir={tmp_path},' * (path == folder)} and "
                                                   rf"set the dataset to {name}\."):
            _load(str(path), tmp_path / "data")
    assert len(_load(name, tmp_path).train.labels) == 5 * (10 if name == "cifar10" else len(CIFAR100_SOME))  # the fix


@pytest.mark.parametrize("labels, fault", [
    (lambda y: y[:-3], "17 labels for 20 images"),  # later labels would shift onto the wrong images
    (lambda y: [*y[:-1], 12], "label 12"),
    (lambda y: [*y[:-1], 10], "label 10"),  # one past the last of cifar10's 10 classes
    (lambda y: [-1, *y[1:]], "label -1"),
    (lambda y: [0.5] * len(y), "not integers"),
    (lambda y: 5, "labels that are no flat list"),
    (lambda y: [[v] for v in y], "labels that are no flat list"),
])
def test_cifar_labels_that_do_not_fit_the_images_are_refused(tmp_path, labels, fault):
    """verify_checksums=false reads a modified copy: its labels must still fit its images and classes."""
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=10, test_per_class=2)
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"] = labels(batch[b"labels"])
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(TransferkitError, match=f"data_batch_1.*{fault}.*Fix"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


def _strided_array(n: int, dtype: str, item: bytes) -> bytes:
    """Pickle opcodes that call numpy.ndarray(shape=(n,), dtype, buffer=item, offset=0, strides=(0,)):
    an n-element array over one item's bytes, which pickle.dumps never writes for a real array."""
    return (b"cnumpy\nndarray\n(\x8a\x08" + struct.pack("<q", n) + b"\x85cnumpy\ndtype\n(X"
            + struct.pack("<I", len(dtype)) + dtype.encode() + b"\x89\x88tRC" + bytes([len(item)]) + item
            + b"K\x00K\x00\x85tR")


def _batch_with(labels: bytes) -> bytes:
    """A data_batch pickle of 200 real images whose labels are the pickle opcodes `labels`."""
    images = pickle.dumps({b"data": np.zeros((200, 3072), np.uint8)}, protocol=2)[:-1]  # no STOP opcode
    return images + b"C\x06labels" + labels + b"s."


@pytest.mark.parametrize("pickled", [
    b"\x80\x02}(C\x04data" + _strided_array(2 * 10 ** 5 * 3072, "u1", b"\0") + b"C\x06labels]u.",  # 600 MB, 1 byte
    _batch_with(_strided_array(10 ** 6, "i8", bytes(8))),  # 8 MB of labels from 8 bytes
    _batch_with(b"(" + _strided_array(2 ** 40, "i8", bytes(8)) + b"t"),  # in a tuple: np.asarray copies it out
    _batch_with(b"]" + _strided_array(2 ** 40, "i8", bytes(8)) + b"a"),  # in a list, likewise (8 TB)
], ids=["images", "labels", "labels in a tuple", "labels in a list"])
def test_a_cifar_array_larger_than_its_file_is_refused(tmp_path, pickled):
    """A few bytes of pickle can build an array of any size by a zero stride (no official file does): refused as
    the file is read, before anything copies it, instead of filling the machine's memory."""
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=10, test_per_class=2)
    (folder / "data_batch_2").write_bytes(pickled)
    with pytest.raises(TransferkitError, match=r"data_batch_2 is not plain data.*it calls numpy\.ndarray directly"
                                               r".*Fix: delete"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


@pytest.mark.parametrize("batch, fault", [({b"data": [0] * 3072, b"labels": [0]}, "images that are not uint8 rows of "
                                           "3072 bytes .* but a list"),
                                          ({b"data": np.zeros((1, 3072), np.uint8), b"labels": (0,)},
                                           "labels that are no flat list of numbers")])
def test_cifar_images_or_labels_of_another_type_are_refused(tmp_path, batch, fault):
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=10, test_per_class=2)
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(TransferkitError, match=f"data_batch_2 (holds|has) {fault}.*Fix: delete"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


@pytest.mark.parametrize("names, fault", [
    ([b"a\xff", b"b"], "class names that are not UTF-8 text"),
    (5, "class names that are no list"),
    (None, "class names that are no list"),
    ([b"cat", 3], "class names that are not text"),
    ([b"cat", b"dog", b"cat"], "class 'cat' twice"),
])
def test_cifar_class_names_that_are_not_a_list_of_distinct_names_are_refused(tmp_path, names, fault):
    folder = write_cifar_pickles(tmp_path, "cifar10", ["cat", "dog", "frog"], train_per_class=5, test_per_class=1)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    with pytest.raises(TransferkitError, match=f"batches.meta has {fault}.*Fix: delete"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


@pytest.mark.parametrize("data", [np.zeros((3072, 10), np.uint8), np.zeros((10, 3, 32, 32), np.uint8),
                                  np.zeros(30720, np.uint8)])
def test_cifar_images_not_in_rows_of_3072_are_refused(tmp_path, data):
    """The official layout is one row of 3072 bytes per image: a transposed or reshaped array of the
    same size would read as scrambled images."""
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=10, test_per_class=2)
    batch = pickle.loads((folder / "data_batch_1").read_bytes())
    (folder / "data_batch_1").write_bytes(pickle.dumps({**batch, b"data": data}))
    with pytest.raises(TransferkitError, match="data_batch_1 holds images that are not uint8 rows of 3072.*Fix"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


def test_cifar100_pickles_are_read(tmp_path):
    folder = write_cifar_pickles(tmp_path, "cifar100", CIFAR100_SOME, train_per_class=4, test_per_class=3)
    raw = read_cifar_pickles(folder, "cifar100", verify_checksums=False)
    assert raw.classes == CIFAR100_SOME
    assert raw.train.images.shape == (12, 3, 32, 32) and raw.train.images.dtype == torch.uint8
    assert raw.test.images.shape == (9, 3, 32, 32)
    assert raw.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # fine_labels, not coarse
    assert raw.test.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    via_load = _load("cifar100", tmp_path)
    assert torch.equal(via_load.train.images, raw.train.images)
    # a superclass name (its pickles hold those labels too) is no class here, and the refusal says so (walk H84)
    with pytest.raises(TransferkitError, match=r"unknown class 'aquatic_mammals' in data.target.classes: .* "
                                               r"CIFAR-100's classes are its 100 fine labels; a superclass such as "
                                               r"aquatic_mammals is none\. Fix:"):
        select_task(raw, [CIFAR100_SOME[0], "aquatic_mammals"], train_per_class=1, val_per_class=1,
                    test_per_class=None, seed=0, role="target")


@pytest.mark.parametrize("name,classes", [("cifar10", CIFAR10_CLASSES), ("cifar100", CIFAR100_SOME)])
def test_checksums_reject_non_official_files(tmp_path, name, classes):
    write_cifar_pickles(tmp_path, name, classes, train_per_class=5, test_per_class=1)
    with pytest.raises(TransferkitError, match="checksum") as e:
        _load(name, tmp_path, verify_checksums=True)
    assert "verify_checksums" in str(e.value)  # the way out for a deliberately modified copy


def test_missing_batch_file_is_named(tmp_path):
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    (folder / "data_batch_3").unlink()
    with pytest.raises(TransferkitError) as e:
        _load("cifar10", tmp_path)
    msg = str(e.value)
    assert "data_batch_3" in msg and "missing" in msg and "Fix" in msg


def test_unreadable_pickle_is_reported(tmp_path):
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    (folder / "test_batch").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TransferkitError, match="test_batch.*not a readable CIFAR pickle"):
        _load("cifar10", tmp_path)


def test_a_pickle_asking_for_an_array_of_python_objects_is_refused_before_it_is_filled(tmp_path):
    """numpy fills an object array with None as it is unpickled: a 178-byte file asked for 800 MB, before any
    size check (with data.verify_checksums=false, for a modified copy of the files)."""
    import pickle

    import numpy as np

    class Objects:
        def __reduce__(self):
            return np.ndarray, ((10**9,), np.dtype("O"))

    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Objects(), b"labels": [0]}, protocol=2))
    with pytest.raises(TransferkitError, match=r"test_batch .*numpy\.dtype of Python objects"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


@pytest.mark.parametrize("call", ["ndarray of text 'O'", "_reconstruct of a large shape", "zero-size dtype"])
def test_a_pickle_cannot_make_an_array_larger_than_its_own_bytes(tmp_path, call):
    """numpy.ndarray called with the dtype as text ("O": Python objects) skipped the dtype check, and _reconstruct
    took any shape: a few hundred bytes of pickle asked for gigabytes. numpy's own pickles make an empty array and
    fill it from the file's bytes."""
    import pickle

    import numpy as np
    from numpy._core.multiarray import _reconstruct

    big = (10**7,)
    reduced = {"ndarray of text 'O'": (np.ndarray, (big, "O")),
               "_reconstruct of a large shape": (_reconstruct, (np.ndarray, big, b"O")),
               "zero-size dtype": (_reconstruct, (np.ndarray, (0,), np.dtype("S0")))}[call]

    class Big:
        def __reduce__(self):
            return reduced

    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    meta = pickle.loads((folder / "batches.meta").read_bytes())
    (folder / "batches.meta").write_bytes(pickle.dumps({**meta, b"x": Big()}, protocol=2))
    with pytest.raises(TransferkitError, match=r"batches.meta is not plain data.*it calls numpy"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


@pytest.mark.parametrize("flags", [0x01, 0x0A])  # hasobject; LIST_PICKLE | NEEDS_INIT
def test_a_pickle_cannot_give_a_dtype_flags_that_make_numpy_read_bytes_as_objects(tmp_path, flags):
    """A dtype's pickled state sets its flags: as 'holding Python objects', 3,072 bytes of pixels were read as
    pointers (the interpreter died later), and with the list flags reading them crashed the process (rc 139)."""
    import pickle

    import numpy as np
    from numpy._core.multiarray import _reconstruct

    class Flagged:
        def __reduce__(self):
            return np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, flags)

    class Pixels:
        def __reduce__(self):
            return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1, 3072), Flagged(), False, bytes(3072))

    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Pixels(), b"labels": [0]}, protocol=2))
    with pytest.raises(TransferkitError, match=r"data_batch_2 is not plain data.*numpy.dtype with the state"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


def test_a_pickle_cannot_set_state_on_what_the_reader_hands_out(tmp_path):
    """BUILD on a global sets its attributes (a function's, for the rest of the process): refused."""
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    (folder / "batches.meta").write_bytes(b"\x80\x02cnumpy\ndtype\n}X\x01\x00\x00\x00xK\x01sb.")
    with pytest.raises(TransferkitError, match=r"batches.meta is not plain data.*a state set on numpy.dtype"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


def test_pickles_of_protocol_5_are_read(tmp_path):
    """A modified copy saved by today's pickle.dump(protocol=5) holds its arrays through numpy's _frombuffer."""
    import pickle

    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=2)
    expected = read_cifar_pickles(folder, "cifar10", verify_checksums=False)
    for f in folder.iterdir():
        f.write_bytes(pickle.dumps(pickle.loads(f.read_bytes()), protocol=5))
    assert b"_frombuffer" in (folder / "data_batch_1").read_bytes()
    raw = read_cifar_pickles(folder, "cifar10", verify_checksums=False)
    assert torch.equal(raw.train.images, expected.train.images) and torch.equal(raw.test.labels, expected.test.labels)


def test_a_pickle_that_encodes_bytes_into_more_bytes_is_refused_before_they_grow(tmp_path):
    """_codecs.encode, which protocol-2 pickles of numpy arrays call to turn text into latin-1 bytes, took any
    codec: hex doubles its input, and 312 bytes of nested calls asked for 16 MB (36 levels: about 100 GB)."""
    import codecs
    import pickle

    class Hex:
        def __init__(self, inner):
            self.inner = inner

        def __reduce__(self):
            return codecs.encode, (self.inner, "hex")

    payload = b"x"
    for _ in range(3):
        payload = Hex(payload)
    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": payload}, protocol=2))
    with pytest.raises(TransferkitError, match=r"batches.meta .*_codecs.encode of bytes to hex"):
        read_cifar_pickles(folder, "cifar10", verify_checksums=False)


# ============================================================== image folders and archives
CLASSES4 = ["bird", "cat", "dog", "frog"]


@pytest.fixture
def jpeg_pair(tmp_path):
    """The same tiny image tree as a folder and as a .tar.gz."""
    folder = write_image_folder(tmp_path / "dir", CLASSES4, 3, 2, archive=False)
    archive = write_image_folder(tmp_path / "tar", CLASSES4, 3, 2, archive=True)
    return folder, archive


def test_image_folder_and_archive_agree(jpeg_pair):
    folder, archive = jpeg_pair
    a, b = read_image_folder(folder), read_image_folder(archive)
    for raw in (a, b):
        assert raw.classes == CLASSES4
        assert raw.train.images.shape == (12, 3, 32, 32) and raw.train.images.dtype == torch.uint8
        assert raw.test.images.shape == (8, 3, 32, 32)
        assert raw.train.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
        assert raw.test.labels.tolist() == [0] * 2 + [1] * 2 + [2] * 2 + [3] * 2
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    # image k of the train split is the k-th file in sorted order, decoded by PIL as-is
    for k, rel in ((0, "train/bird/0000.jpg"), (4, "train/cat/0001.jpg"), (5, "test/dog/0001.jpg")):
        split = a.train if rel.startswith("train") else a.test
        expected = np.asarray(Image.open(folder / rel).convert("RGB")).transpose(2, 0, 1)
        assert torch.equal(split.images[k], torch.from_numpy(expected.copy())), rel


def test_a_hard_linked_image_in_an_archive_counts_as_in_its_folder(jpeg_pair, tmp_path):
    """GNU tar stores a second name of one inode as a hard link: the archive must still hold that image
    (a deduplicated dataset, `cp -al`), as the folder it was made from does. A link to nothing is a damaged
    archive, in one error."""
    import subprocess

    folder, _ = jpeg_pair
    copy = tmp_path / "linked"
    shutil.copytree(folder, copy)
    os.link(copy / "train" / "bird" / "0000.jpg", copy / "train" / "cat" / "0099.jpg")
    archive = tmp_path / "linked.tar.gz"
    subprocess.run(["tar", "czf", str(archive), "-C", str(tmp_path), "linked"], check=True)
    with tarfile.open(archive) as tar:
        assert any(m.islnk() for m in tar)  # what this test is about
    a, b = read_image_folder(copy), read_image_folder(archive)
    assert len(b.train.labels) == len(a.train.labels) == 13 and b.train.labels.tolist() == a.train.labels.tolist()
    assert torch.equal(a.train.images, b.train.images)
    # the same archive without the file the link names: a damaged archive, not a traceback
    with tarfile.open(archive) as tar, tarfile.open(tmp_path / "broken.tar", "w") as out:
        for m in tar:
            if not (m.isfile() and m.name.endswith("bird/0000.jpg")):
                out.addfile(m, tar.extractfile(m) if m.isfile() else None)
    with pytest.raises(TransferkitError, match="0099.jpg in .*broken.tar links to linked/train/bird/0000.jpg, which is "
                                               "no file or folder in the archive. Fix"):
        read_image_folder(tmp_path / "broken.tar")


@pytest.mark.parametrize("link, target", [("current", "."), ("train/cat/up", "../..")])
def test_a_link_back_to_a_folder_read_already_is_one_error(jpeg_pair, tmp_path, link, target):
    """`current -> .` read every image 41 times (os.walk stops at the link depth limit without a word), val images
    among train's; two links to a folder above hung prepare with memory growing. A link to a folder beside (a
    class folder kept elsewhere) is read once: test_a_linked_class_folder_in_an_archive_counts_as_in_its_folder."""
    folder, _ = jpeg_pair
    (folder / link).symlink_to(target)
    with pytest.raises(TransferkitError, match=r"is .* again \(through a link\): its images would be read over "
                                               r"and over\. Fix: remove the link"):
        read_image_folder(folder, 8)


def test_a_symlinked_image_counts_in_an_archive_as_in_its_folder(jpeg_pair, tmp_path):
    """A folder's reader follows a symbolic link, so the archive made from it (plain `tar`, which stores
    the link) must hold the same images; links to nothing in the archive, or in a loop, are one error."""
    import subprocess

    folder, _ = jpeg_pair
    copy = tmp_path / "linked"
    shutil.copytree(folder, copy)
    (copy / "train" / "cat" / "0099.jpg").symlink_to("../bird/0000.jpg")
    archive = tmp_path / "linked.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", str(tmp_path), "linked"], check=True)
    a, b = read_image_folder(copy), read_image_folder(archive)
    assert len(b.train.labels) == len(a.train.labels) == 13 and b.train.labels.tolist() == a.train.labels.tolist()
    assert torch.equal(a.train.images, b.train.images)
    for name, links in (("outside", [("linked/train/cat/0099.jpg", "/etc/passwd")]),
                        ("loop", [("linked/train/cat/s1.jpg", "s2.jpg"), ("linked/train/cat/s2.jpg", "s1.jpg")])):
        with tarfile.open(tmp_path / f"{name}.tar", "w") as out:
            for link, target in links:
                info = tarfile.TarInfo(link)
                info.type, info.linkname = tarfile.SYMTYPE, target
                out.addfile(info)
        with pytest.raises(TransferkitError, match=f"{name}.tar links to .*, which is no file or folder in the"):
            read_image_folder(tmp_path / f"{name}.tar")


def test_a_tar_cut_short_between_two_members_is_refused(jpeg_pair, tmp_path):
    """A copy interrupted on a 4 KiB boundary usually stops between two members of a tar of small JPEGs:
    read as it is, the dataset would silently lose images."""
    folder, _ = jpeg_pair
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(folder, arcname="d")
    with tarfile.open(whole) as tar:
        ends = [m.offset_data + -(-m.size // 512) * 512 for m in tar if m.isfile()]
    for fmt in ("", "-pax"):  # the header scan reads a plain tar; tarfile reads one with pax records
        raw = whole.read_bytes()
        if fmt:
            with tarfile.open(tmp_path / "p.tar", "w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(folder, arcname="d" * 120)  # a long name: a pax record, which the scan leaves to tarfile
            raw = (tmp_path / "p.tar").read_bytes()
            with tarfile.open(tmp_path / "p.tar") as tar:
                ends = [m.offset_data + -(-m.size // 512) * 512 for m in tar if m.isfile()]
        cut = tmp_path / f"cut{fmt}.tar"
        cut.write_bytes(raw[:ends[len(ends) // 2]])
        with pytest.raises(TransferkitError, match=f"cut{fmt}.tar .*without tar's end marker: it was cut short"):
            read_image_folder(cut)


def test_image_archive_via_load_dataset(tmp_path):
    write_image_folder(tmp_path, CLASSES4, 2, 1)  # -> tmp_path/cifar10-jpeg.tar.gz
    raw = _load("cifar10", tmp_path)
    assert raw.classes == CLASSES4 and len(raw.train.labels) == 8 and len(raw.test.labels) == 4
    by_path = _load(str(tmp_path / "cifar10-jpeg.tar.gz"), tmp_path / "elsewhere")
    assert torch.equal(by_path.train.images, raw.train.images)
    relative = _load("cifar10-jpeg.tar.gz", tmp_path)  # a relative path is looked up in data_dir
    assert torch.equal(relative.test.images, raw.test.images)


def test_the_official_release_beside_an_archive_of_it_is_read_with_a_word(tmp_path, capsys):
    """data/ with cifar-10-batches-py/ and cifar10-jpeg.tar.gz: the pickles win, whose images are not the JPEGs'."""
    write_image_folder(tmp_path, CLASSES4, 2, 1)  # -> tmp_path/cifar10-jpeg.tar.gz
    _load("cifar10", tmp_path)
    assert capsys.readouterr().err == ""  # one copy: nothing to say
    write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, 5, 1)
    _load("cifar10", tmp_path)
    assert capsys.readouterr().err == (
        f"prepare: {tmp_path} holds cifar10 2 times: it reads cifar-10-batches-py/ (the official release first, then "
        f".tar.gz, .zip, a folder), not cifar10-jpeg.tar.gz. Fix: remove the copies you do not mean, or give the one "
        f"you mean by its path as the dataset.\n")


def test_an_archive_extracted_beside_itself_is_read_with_a_word_naming_the_copy_read(tmp_path, capsys):
    """data/cifar10-jpeg.tar.gz and the folder extracting it makes, edited: the archive is read, and prepare says
    so, rather than take the folder's edits silently for nothing (walk H84)."""
    write_image_folder(tmp_path, CLASSES4, 2, 1)
    write_image_folder(tmp_path, ["unicorn", *CLASSES4[1:]], 2, 1, archive=False)  # tmp_path/cifar10-jpeg/
    write_image_folder(tmp_path, CLASSES4[:2], 2, 1, archive="zip")  # tmp_path/cifar10-jpeg.zip
    raw = _load("cifar10", tmp_path)
    assert raw.classes == CLASSES4  # the .tar.gz's
    assert capsys.readouterr().err == (
        f"prepare: {tmp_path} holds cifar10 3 times: it reads cifar10-jpeg.tar.gz (the official release first, then "
        f".tar.gz, .zip, a folder), not cifar10-jpeg.zip and cifar10-jpeg/. Fix: remove the copies you do not mean, "
        f"or give the one you mean by its path as the dataset.\n")
    assert "unicorn" in _load(str(tmp_path / "cifar10-jpeg"), tmp_path).classes  # the fix, taken
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("split", ["train", "test"])
def test_one_split_of_a_dataset_given_as_the_dataset_names_its_parent(tmp_path, split):
    """D/train/ holds class folders, as a dataset with no split would: the advice is to give D, not to split D/train
    again (walk H84)."""
    root = write_image_folder(tmp_path, CLASSES4, 2, 1, archive=False)
    with pytest.raises(TransferkitError) as e:
        _load(str(root / split), tmp_path)
    assert str(e.value) == (f"{root / split} is the {split}/ split of the dataset {root}, which holds train/ and "
                            f"test/. Fix: give {root} as the dataset.")
    named = write_image_folder(tmp_path / "p", CLASSES4, 2, 1, archive=False, top=split)  # a dataset named so
    (tmp_path / "p" / ("test" if split == "train" else "train")).mkdir()  # beside another folder of such a name
    assert _load(str(named), tmp_path).classes == CLASSES4


def test_a_failed_download_leaves_no_folders_it_made(tmp_path, monkeypatch):
    """An offline download into a mistyped paths.data_dir: torchvision makes the folder before it fails, and a failed
    run leaves no empty tree behind (walk H84). A folder that was there stays."""
    def offline(name, data_dir):
        data_dir.mkdir(parents=True)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(resolve, "download_cifar", offline)
    with pytest.raises(TransferkitError, match="download failed"):
        _load("cifar10", tmp_path / "no" / "such" / "data", download=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("download", [False, True])
def test_the_official_download_left_unextracted_is_named(tmp_path, monkeypatch, download):
    """cifar-10-python.tar.gz in data/, not extracted: the error names it and how to extract it; where a download
    was tried and failed, torchvision did not take it (its md5 is not the official one), and the error says so."""
    monkeypatch.setattr(resolve, "download_cifar", lambda name, data_dir: (_ for _ in ()).throw(OSError("offline")))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the official md5")
    with pytest.raises(TransferkitError) as e:
        _load("cifar10", tmp_path, download=download)
    assert (f"{tmp_path}/cifar-10-python.tar.gz is there, not the official file (its md5 differs): remove it before "
            f"downloading again" if download else
            f"{tmp_path}/cifar-10-python.tar.gz is there, not extracted: `tar -xzf cifar-10-python.tar.gz` in "
            f"{tmp_path}/, or data.download=true, which extracts it where its md5 is the official one") in str(e.value)


@pytest.mark.parametrize("as_archive", [False, True])
def test_wanted_restricts_decoded_classes(tmp_path, as_archive):
    path = write_image_folder(tmp_path, CLASSES4, 3, 2, archive=as_archive)
    full = read_image_folder(path)
    raw = read_image_folder(path, wanted={"cat", "frog"})
    assert raw.classes == CLASSES4  # every class seen keeps its index
    assert sorted(set(raw.train.labels.tolist())) == [1, 3]
    assert len(raw.train.labels) == 6 and len(raw.test.labels) == 4
    keep = (full.train.labels == 1) | (full.train.labels == 3)
    assert torch.equal(raw.train.images, full.train.images[keep])
    assert torch.equal(raw.train.labels, full.train.labels[keep])


def test_wanted_files_are_the_only_ones_decoded(tmp_path):
    """A corrupt image in an unwanted class is never decoded, so it does not matter."""
    folder = write_image_folder(tmp_path, CLASSES4, 2, 1, archive=False)
    (folder / "train" / "bird" / "0000.jpg").write_bytes(b"garbage" * 20)
    raw = read_image_folder(folder, wanted={"cat", "dog"})
    assert len(raw.train.labels) == 4
    with pytest.raises(TransferkitError, match=r"corrupt image .*/train/bird/0000\.jpg .*Fix: leave that file out"):
        read_image_folder(folder)  # wanted, it is


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
@pytest.mark.parametrize("compression", ["gz", "bz2", ""])
def test_archives_read_by_header_scan_or_by_tarfile_give_the_same_images(tmp_path, fmt, compression):
    """Plain headers (names in ustar's prefix field too) are read by the header scan, the rest (long
    names as pax records or GNU entries, links) by tarfile: the same files and pixels either way."""
    folder = write_image_folder(tmp_path / "src", CLASSES4, 2, 1, archive=False)
    deep = "d" * 60 + "/" + "e" * 60  # a 150-character path does not fit ustar's 100-character name field
    path = tmp_path / f"{fmt}.tar{'.' + compression if compression else ''}"
    with tarfile.open(path, f"w:{compression}", format=getattr(tarfile, f"{fmt.upper()}_FORMAT")) as tar:
        for p in sorted(folder.rglob("*")):
            tar.add(p, arcname=f"{deep}/{p.relative_to(folder.parent)}", recursive=False)
        if fmt == "gnu":  # a link: tarfile's to read (its target's bytes)
            link = tarfile.TarInfo(f"{deep}/cifar10-jpeg/train/cat/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "0000.jpg"
            tar.addfile(link)
    with tarfile.open(path) as tar:
        want = {m.name: tar.extractfile(m).read() for m in tar if m.isfile() or m.issym()}
    raw = bytearray(path.read_bytes())
    if compression == "gz":
        raw = bytearray(gzip.decompress(raw))
    scanned = archives._tar_files(raw)
    assert (scanned is None) == (compression == "bz2" or fmt != "ustar")  # by tarfile, or the scan read them
    if scanned is not None:
        assert {name: bytes(data) for name, data in scanned} == want
    assert {name: bytes(data) for name, data in archives.archive_files(path)} == want
    if fmt == "gnu":  # the folder with the link the archive holds
        (folder / "train" / "cat" / "link.jpg").symlink_to("0000.jpg")
    a, b = read_image_folder(folder), read_image_folder(path)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)


COMPRESS = {"": bytes, "gz": gzip.compress, "bz2": __import__("bz2").compress, "xz": __import__("lzma").compress}


@pytest.mark.parametrize("damage", ["checksum", "zeroed"])
@pytest.mark.parametrize("fmt", ["ustar", "gnu"])
@pytest.mark.parametrize("compression", sorted(COMPRESS))
@pytest.mark.parametrize("member", [0, 5])
def test_a_damaged_tar_header_is_reported_not_read_as_the_end(tmp_path, member, compression, fmt, damage):
    """The first header damaged: tarfile reports it; a later one, whichever reader reads the tar (the
    header scan; tarfile for GNU long names, which it would end the archive at without a word),
    and whatever compression it is in: the images after it are not left out without a word."""
    folder = write_image_folder(tmp_path / "src", CLASSES4, 2, 1, archive=False)
    deep = "d" * 60 + "/" + "e" * 60 if fmt == "gnu" else "d"  # a long name: a GNU record before each member
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=getattr(tarfile, f"{fmt.upper()}_FORMAT")) as tar:
        for p in sorted(folder.rglob("*")):
            tar.add(p, arcname=f"{deep}/{p.relative_to(folder.parent)}", recursive=False)
    raw = bytearray(buffer.getvalue())
    offset = [info.offset for info in tarfile.open(fileobj=io.BytesIO(raw)).getmembers()][member]
    if damage == "checksum":
        raw[offset + 10] ^= 0xFF  # a byte of that header's name: its checksum no longer matches
    else:
        raw[offset:offset + 512] = bytes(512)  # a header wiped: it reads as the end of the archive
    path = tmp_path / f"{fmt}.tar{'.' + compression if compression else ''}"
    path.write_bytes(COMPRESS[compression](bytes(raw)))
    with pytest.raises(TransferkitError, match="corrupt or unreadable archive") as error:
        read_image_folder(path)
    assert member == 0 or f"header at byte {offset} is damaged" in str(error.value)


def test_a_damaged_xz_stream_is_one_error(tmp_path):
    raw = bytearray(__import__("lzma").compress(gzip.decompress(write_image_folder(tmp_path, CLASSES4, 2, 1)
                                                                .read_bytes())))
    raw[len(raw) // 2] ^= 0xFF
    path = tmp_path / "cifar10-jpeg.tar.xz"
    path.write_bytes(raw)
    with pytest.raises(TransferkitError, match=r"corrupt or unreadable archive .*LZMAError.*Fix"):
        read_image_folder(path)


@pytest.mark.parametrize("linked", [False, True])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_name_stored_twice_is_the_version_extracting_gives(tmp_path, kind, linked):
    """`tar -r` and `zip -u` append a file's new version and keep the old: the folder the archive
    extracts to holds one image there, and so does what prepare reads (not two, in train and val). With
    `linked`, the version before the last is a link: the file that replaced it is all the name holds."""
    import warnings

    folder = write_image_folder(tmp_path / "src", CLASSES4, 3, 1, archive=False)
    files = {f"cifar10-jpeg/{p.relative_to(folder)}": p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}
    name, new = "cifar10-jpeg/train/cat/0000.jpg", files["cifar10-jpeg/train/cat/0001.jpg"]
    versions = [*files.items(), *([(name, None)] if linked else []), (name, new)]  # None: a link to 0002.jpg
    path = tmp_path / f"cifar10-jpeg.{kind}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
        if kind == "zip":
            with zipfile.ZipFile(path, "w") as archive:
                for member, data in versions:
                    archive.writestr(*((member, data) if data is not None else _zip_link(member, "0002.jpg")))
        else:
            with tarfile.open(path, "w") as archive:
                for member, data in versions:
                    info = tarfile.TarInfo(member)
                    if data is None:
                        info.type, info.linkname = tarfile.SYMTYPE, "0002.jpg"
                    else:
                        info.size = len(data)
                    archive.addfile(info, io.BytesIO(data) if data is not None else None)
    read = archives.archive_files(path)
    assert sorted(n for n, _ in read) == sorted(files) and bytes(dict(read)[name]) == new
    assert len(read_image_folder(path).train.images) == len(read_image_folder(folder).train.images)


def test_a_tar_header_summed_as_signed_bytes_is_read(tmp_path):
    """Some old tars summed a header's bytes as signed numbers; tarfile accepts either sum, and so does the scan."""
    path = write_image_folder(tmp_path, CLASSES4, 2, 1)
    raw = bytearray(gzip.decompress(path.read_bytes()))
    want = archives._tar_files(raw)
    raw[99] = 0xB4  # a byte above 127 in the name field, after the name's end (both readers ignore it)
    header = raw[:512]
    signed = sum(b - 256 * (b >= 128) for b in header[:148] + header[156:]) + 8 * ord(" ")
    raw[148:156] = b"%06o\0 " % signed
    assert signed != sum(header[:148] + header[156:]) + 8 * ord(" ")  # the unsigned sum would differ
    got = archives._tar_files(raw)
    assert got is not None and [(n, bytes(d)) for n, d in got] == [(n, bytes(d)) for n, d in want]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # tarfile reads it alike
        assert [m.name for m in tar if m.isfile()] == [n for n, _ in want]


def test_archive_member_order_does_not_matter(tmp_path):
    folder = write_image_folder(tmp_path / "src", CLASSES4, 3, 2, archive=False)
    files = [p for p in folder.rglob("*.jpg")]
    random.Random(7).shuffle(files)
    shuffled = tmp_path / "shuffled.tar.gz"
    with tarfile.open(shuffled, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(folder.parent)))
    with tarfile.open(shuffled) as tar:
        names = tar.getnames()
    assert names != sorted(names)  # really out of order
    a, b = read_image_folder(folder), read_image_folder(shuffled)
    assert a.classes == b.classes
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_hidden_files_and_folders_are_not_images(tmp_path, kind):
    """An archive made on macOS holds a `._NAME` file (no image) beside every file, or under
    __MACOSX/ in a zip; Jupyter leaves .ipynb_checkpoints folders; a hidden folder above the split
    (`.old/train/...`): none adds images, nor a class."""
    import zipfile

    clean = write_image_folder(tmp_path / "clean", CLASSES4, 3, 2, archive=False)
    folder = shutil.copytree(clean, tmp_path / "messy" / clean.name)
    for f in list(folder.rglob("*.jpg")):
        (f.parent / f"._{f.name}").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X        ")
    (folder / "train" / ".ipynb_checkpoints").mkdir()
    shutil.copy(folder / "train" / "cat" / "0000.jpg", folder / "train" / ".ipynb_checkpoints" / "0000.jpg")
    shutil.copytree(folder / "train", folder / ".old" / "train")  # a hidden folder above the split too
    path = folder if kind == "folder" else tmp_path / f"messy.{kind}"
    if kind == "tar.gz":
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder, arcname=f"./{folder.name}")  # "./" first, as `tar -C DIR .` writes it
    elif kind == "zip":  # as macOS's Finder writes one: the ._ files under __MACOSX/
        with zipfile.ZipFile(path, "w") as archive:
            for f in sorted(folder.rglob("*")):
                name = f.relative_to(folder.parent).as_posix()
                archive.write(f, f"__MACOSX/{name}" if f.name.startswith("._") else name)
    want, got = read_image_folder(clean), read_image_folder(path)
    assert got.classes == want.classes == sorted(CLASSES4)
    for split in ("train", "test"):
        assert torch.equal(getattr(got, split).images, getattr(want, split).images)
        assert torch.equal(getattr(got, split).labels, getattr(want, split).labels)


def test_a_zip_archive_is_found_and_read_as_a_tar_is(tmp_path):
    import zipfile

    folder = write_image_folder(tmp_path / "src", CLASSES4, 2, 1, archive=False)
    write_image_folder(tmp_path / "data", CLASSES4, 2, 1, archive="zip")  # the same images: data/cifar10-jpeg.zip
    a = read_image_folder(folder)
    b = load_dataset("cifar10", tmp_path / "data", download=False, verify_checksums=True, image_size=32, wanted=None)
    assert a.classes == b.classes and torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes((tmp_path / "data" / "cifar10-jpeg.zip").read_bytes()[:-40])  # its directory cut
    with pytest.raises(TransferkitError, match=r"corrupt or unreadable archive .* Fix: copy it into .*\.zip\), or give "
                                               r"a folder or archive of train/<class>/\*, test/<class>/\* as the "
                                               r"dataset\.$"):
        read_image_folder(damaged)
    (tmp_path / "labels.csv").write_text("file,label\n")  # no archive at all: the fix names what is one
    with pytest.raises(TransferkitError, match=r"labels.csv .* or give a folder or archive of train/<class>/\*"):
        read_image_folder(tmp_path / "labels.csv")
    stored = tmp_path / "stored.zip"  # its members' method set to deflate64, which zipfile cannot read
    with zipfile.ZipFile(stored, "w") as archive:
        archive.writestr("cifar10-jpeg/train/cat/0000.jpg", b"\xff\xd8 a jpeg")
    raw = bytearray(stored.read_bytes())
    for header, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        where = raw.find(header)
        raw[where + at:where + at + 2] = (9).to_bytes(2, "little")
    stored.write_bytes(raw)
    # not "corrupt": copying it again would not help, re-creating it would
    with pytest.raises(TransferkitError, match=r"stored.zip holds a member Python's zipfile cannot read \(That "
                                               r"compression method is not supported\).*Deflate64.*Fix: re-create it"):
        read_image_folder(stored)


def test_a_zip_whose_directory_points_outside_it_is_one_error(tmp_path):
    """zipfile raises ValueError (a negative seek) for a directory offset moved past the start."""
    path = write_image_folder(tmp_path, CLASSES4, 2, 1, archive="zip")
    raw = bytearray(path.read_bytes())
    end = raw.rfind(b"PK\x05\x06")  # the end-of-directory record: the directory's offset at +16
    raw[end + 16:end + 20] = (int.from_bytes(raw[end + 16:end + 20], "little") + 100).to_bytes(4, "little")
    path.write_bytes(raw)
    with pytest.raises(TransferkitError, match=r"corrupt or unreadable archive .*ValueError.* Fix: copy it into"):
        read_image_folder(path)


def _archive_with(tmp_path, fmt: str, members: dict[str, bytes]):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / f"big.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return path
    with tarfile.open(path, f"w:{fmt.split('.')[-1] if '.' in fmt else ''}") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", ["tar", "tar.gz", "tar.bz2", "zip"])
def test_an_archive_that_expands_past_the_memory_limit_is_refused_before_it_is_read(tmp_path, monkeypatch, fmt):
    """A few kilobytes of zeros compressed can claim gigabytes: the archive is refused once what it expands to
    passes the limit (a quarter of the memory this process may use; 1 MB here), naming the way around it."""
    monkeypatch.setattr(archives, "memory_limit", lambda: 10 ** 6)
    small = write_image_folder(tmp_path / "small", CLASSES4, 2, 1, archive=False)
    members = {str(f.relative_to(small.parent)): f.read_bytes() for f in sorted(small.rglob("*.jpg"))}
    fits = _archive_with(tmp_path / "fits", fmt, {**members, "cifar10-jpeg/README.txt": bytes(300_000)})
    assert len(read_image_folder(fits).train.labels) == 8
    bomb = _archive_with(tmp_path, fmt, {**members, "cifar10-jpeg/train/cat/big.png": bytes(3 * 10 ** 6)})
    with pytest.raises(TransferkitError, match=rf"big.{fmt} expands to more than 1.0 MB, over a quarter of the "
                                               r"memory this process may use.*Fix: extract it .* give that folder"):
        read_image_folder(bomb)


def test_a_zip_whose_members_together_expand_past_the_memory_limit_is_refused(tmp_path, monkeypatch):
    """The limit bounds what a zip's members expand to together, not each member alone: two members of 0.6 MB
    go past a 1 MB limit, one fits."""
    monkeypatch.setattr(archives, "memory_limit", lambda: 10 ** 6)
    one = _archive_with(tmp_path / "one", "zip", {"top/train/cat/a.png": bytes(600_000)})
    assert [len(data) for _, data in archives.archive_files(one)] == [600_000]
    two = _archive_with(tmp_path / "two", "zip", {"top/train/cat/a.png": bytes(600_000),
                                                  "top/train/cat/b.png": bytes(600_000)})
    with pytest.raises(TransferkitError, match=r"big.zip expands to more than 1.0 MB"):
        archives.archive_files(two)


def test_a_dataset_path_that_is_a_device_or_a_pipe_is_refused_before_it_is_read(tmp_path):
    """A device says 0 bytes, so the size check passed and /dev/zero was read until memory ran out; a pipe's read
    waited for a writer for ever."""
    fifo = tmp_path / "pipe.tar.gz"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(TransferkitError, match=rf"{path} is no file but a device or a pipe. Fix: give a folder"):
            read_image_folder(path)


def test_an_archive_that_meets_a_process_memory_limit_below_the_cap_is_one_error(tmp_path, monkeypatch):
    """Under `ulimit -v`, reading a large archive ran out of memory before the cap: a traceback ending in
    MemoryError, where the same one line as past the cap says to extract it."""
    small = write_image_folder(tmp_path / "small", CLASSES4, 2, 1, archive=False)
    members = {str(f.relative_to(small.parent)): f.read_bytes() for f in sorted(small.rglob("*.jpg"))}
    path = _archive_with(tmp_path, "tar.gz", members)

    def out_of_memory(*_):
        raise MemoryError

    monkeypatch.setattr(archives, "_bounded", out_of_memory)
    with pytest.raises(TransferkitError, match=r"big.tar.gz does not fit in the memory this process may use, into "
                                               r"which archives are read. Fix: extract it .* give that folder"):
        read_image_folder(path)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_memory_cap_is_a_quarter_of_a_container_limit_below_the_machines(tmp_path, monkeypatch, version):
    """A container (cgroup) limit below the machine's memory: a quarter of the machine's was more than the
    process could have, and reading ran into the container's out-of-memory kill instead of the one-line error."""
    import psutil

    from transferkit.data import memory

    root, proc = tmp_path / "cgroup", tmp_path / "cgroup.txt"
    if version == "v2":  # the job's group is unlimited, the container above it has 2 GB, the slice above 8
        proc.write_text("0::/slice/container/job\n")
        for group, limit in [("slice", "8000000000"), ("slice/container", "2000000000"),
                             ("slice/container/job", "max")]:
            (root / group).mkdir(parents=True)
            (root / group / "memory.max").write_text(limit + "\n")
    else:
        proc.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
        (root / "memory" / "docker" / "abc").mkdir(parents=True)
        (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("2000000000\n")
        (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert memory.cgroup_limit(proc, root) == 2_000_000_000
    assert memory.cgroup_limit(tmp_path / "no such file", root) is None
    monkeypatch.setattr(memory, "cgroup_limit", lambda: 2_000_000_000)
    assert memory.memory_limit() == min(psutil.virtual_memory().total, 2_000_000_000) // 4


def test_a_container_limit_above_the_machines_memory_leaves_the_machines_cap(tmp_path, monkeypatch):
    """cgroup v1 writes "no limit" as a number (9223372036854771712): the cap stays a quarter of the machine's
    memory, and a group's limit file this process may not read is passed over, the readable ones still count."""
    import psutil

    from transferkit.data import memory

    monkeypatch.setattr(memory, "cgroup_limit", lambda: 9223372036854771712)
    assert memory.memory_limit() == psutil.virtual_memory().total // 4
    monkeypatch.undo()
    root, proc = tmp_path / "cgroup", tmp_path / "cgroup.txt"
    proc.write_text("0::/slice/job\n")
    for group, limit in [("slice", "2000000000"), ("slice/job", "1000000000")]:
        (root / group).mkdir(parents=True)
        (root / group / "memory.max").write_text(limit + "\n")
    unreadable = root / "slice" / "job" / "memory.max"
    read_text = Path.read_text

    def refused(path, *args, **kwargs):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    assert memory.cgroup_limit(proc, root) == 2_000_000_000


def test_an_archive_is_read_in_chunks_never_asking_for_the_whole_limit(tmp_path, monkeypatch):
    """A reader allocates what it is asked for up front: asking for the limit (a quarter of the memory) at
    once fails under `ulimit -v` and costs time for every small member."""
    monkeypatch.setattr(archives, "CHUNK", 1000)
    asked = []
    data = io.BytesIO(bytes(4500))

    def read(n: int) -> bytes:
        asked.append(n)
        return data.read(n)

    assert bytes(archives._bounded(read, 0, 10 ** 9)) == bytes(4500) and max(asked) == 1000
    with pytest.raises(archives._TooLarge):
        archives._bounded(io.BytesIO(bytes(4500)).read, 0, 4499)


def test_a_jpeg_whose_header_claims_a_huge_image_is_refused_before_decoding(monkeypatch):
    """The batched JPEG decoder would decode every file of a part at its full size before the size check;
    a file is sent to it only where its header says image_size x image_size, the rest through PIL, whose
    decompression-bomb limit refuses 645 bytes that claim 20,000 x 20,000 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)  # height, width
    assert sources.jpeg_size(bytes(data)) == (20000, 20000)
    assert sources.jpeg_size(buf.getvalue()) == (8, 8)
    assert sources.jpeg_size(b"\xff\xd8 no segments") is None
    wide = io.BytesIO()
    Image.new("RGB", (12, 8)).save(wide, "JPEG")
    assert sources.jpeg_size(wide.getvalue()) == (12, 8)  # (width, height)
    filled = wide.getvalue()[:2] + b"\xff" + wide.getvalue()[2:]  # a fill byte before a marker, which JPEG allows
    assert sources.jpeg_size(filled) == (12, 8)
    # a marker libjpeg reads without a length (RST0) in front of the real frame, whose length-like bytes skip it,
    # then a decoy 8 x 8 frame header: the decoder would decode the real one, of any size, before a check
    body = bytes(data[2:])
    decoy = b"\xff\xc0\x00\x11\x08\x00\x08\x00\x08\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    hidden = b"\xff\xd8\xff\xd0" + struct.pack(">H", 2 + len(body)) + body + decoy + b"\xff\xd9"
    assert sources.jpeg_size(hidden) is None  # not the batched decoder's: PIL's limit applies
    import torchvision.io

    batched, decode_jpeg = [], torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg",
                        lambda files, **kw: batched.extend(files) or decode_jpeg(files, **kw))
    with pytest.raises(TransferkitError, match=r"image huge.jpg has more than 179 million pixels.*Fix: downscale it"):
        sources.decode_images([("fine.jpg", bytearray(buf.getvalue())), ("huge.jpg", data)], 8, "decoding")
    assert len(batched) == 1  # fine.jpg alone went to the batched decoder
    with pytest.raises(TransferkitError, match=r"image hidden.jpg "):
        sources.decode_images([("fine.jpg", bytearray(buf.getvalue())), ("hidden.jpg", bytearray(hidden))], 8, "")
    assert len(batched) == 2  # fine.jpg again, and never hidden.jpg


def test_other_image_sizes_are_resized(tmp_path):
    root = tmp_path / "imgs"
    colours = {"red": (200, 10, 10), "blue": (10, 20, 230)}
    for split in ("train", "test"):
        for name, rgb in colours.items():
            d = root / split / name
            d.mkdir(parents=True)
            Image.new("RGB", (48, 40), rgb).save(d / "a.png")
            Image.new("RGB", (20, 20), rgb).save(d / "b.png")
    raw = read_image_folder(root, image_size=32)
    assert raw.train.images.shape == (4, 3, 32, 32) and raw.test.images.shape == (4, 3, 32, 32)
    for img, label in zip(raw.train.images, raw.train.labels):
        rgb = colours[raw.classes[label]]
        assert torch.equal(img, torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    small = read_image_folder(root, image_size=16)
    assert small.train.images.shape == (4, 3, 16, 16)


def test_greyscale_and_rgba_become_rgb(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("L", (32, 32), 77).save(root / split / c / "g.png")
            Image.new("RGBA", (32, 32), (1, 2, 3, 255)).save(root / split / c / "r.png")
    raw = read_image_folder(root)
    assert raw.train.images.shape == (4, 3, 32, 32)
    assert raw.train.images[0, :, 0, 0].tolist() == [77, 77, 77]  # g.png sorts before r.png
    assert raw.train.images[1, :, 0, 0].tolist() == [1, 2, 3]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_plain_8bit_rgb_files_decode_as_before(tmp_path):
    """CIFAR-like files (8-bit RGB PNG and JPEG, no EXIF, no alpha) decode to the bytes of a plain
    convert("RGB"), the decoding before orientation, bit-depth and alpha handling: prepare's outputs
    do not move."""
    from transferkit.data.sources import decode_image

    pixels = random_images(1, seed=5, size=48)[0]
    png = _encode(Image.fromarray(pixels), "PNG")
    assert np.array_equal(decode_image(png, "a.png", 48), pixels.transpose(2, 0, 1))
    for data in (png, _encode(Image.fromarray(pixels), "JPEG", quality=90)):
        for size in (48, 32):  # as stored, and resized
            before = Image.open(io.BytesIO(data)).convert("RGB")
            before = before if size == 48 else before.resize((size, size), Image.BILINEAR)
            assert np.array_equal(decode_image(data, "a", size), np.asarray(before).transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_grey_decodes_like_its_8bit_version(mode):
    """A 16-bit PNG (I;16) or a 32-bit integer / float TIFF holds more than 8 bits per sample;
    a plain convert("RGB") clips it to white instead of scaling it."""
    from transferkit.data.sources import decode_image

    wide = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    eight = (wide >> 8).astype(np.uint8)
    if mode == "I;16":
        data = _encode(Image.fromarray(wide), "PNG")
    elif mode == "I":
        data = _encode(Image.fromarray(wide.astype(np.int32)), "TIFF")
    else:
        data = _encode(Image.fromarray(wide.astype(np.float32) / 65535), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    got = decode_image(data, "wide", 32).astype(int)
    want = decode_image(_encode(Image.fromarray(eight), "PNG"), "eight", 32).astype(int)
    assert np.abs(got - want).max() <= 1
    assert np.array_equal(want[0], eight) and 120 <= got.mean() <= 135  # mid grey on average, not white


def test_a_16_bit_image_is_scaled_in_its_own_width_not_in_int64_copies(tmp_path):
    """Scaling went through three int64 copies, 24 bytes a pixel: a 13000 x 13000 16-bit PNG of 328 KB took
    3.8 GB where its 8-bit twin took 1.7. numpy's allocations of the scaling, traced, stay near its 2 bytes."""
    import tracemalloc

    from transferkit.data.sources import _to_rgb

    wide = np.tile((np.arange(1000, dtype=np.uint32) * 65).astype(np.uint16), (1000, 1))
    img = Image.open(io.BytesIO(_encode(Image.fromarray(wide), "PNG")))
    img.load()
    tracemalloc.start()
    try:
        rgb = _to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.asarray(rgb)[..., 0], (wide >> 8).astype(np.uint8))
    assert peak < 8 * wide.size, peak  # old: 16 bytes a pixel


def test_a_float_image_in_pils_own_0_to_255_range_is_not_read_as_white():
    """PIL's convert("F") keeps 0..255; read as 0..1, every sample above 1 came out white."""
    from transferkit.data.sources import decode_image

    eight = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    data = _encode(Image.fromarray(eight).convert("F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert np.array_equal(decode_image(data, "f.tif", 32)[0], eight)


def test_a_float_image_with_a_missing_sample_keeps_the_rest_of_its_pixels():
    """One NaN made the image's maximum NaN, so a 0..1 image was not scaled to 0..255 and came out black (with a
    RuntimeWarning from the cast). NaN shows black; infinities the ends of the range."""
    import warnings

    from transferkit.data.sources import decode_image

    floats = np.full((32, 32), 0.5, np.float32)
    floats[0, :3] = [np.nan, np.inf, -np.inf]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning
        got = decode_image(_encode(Image.fromarray(floats), "TIFF"), "nan.tif", 32)[0]
    assert got[0, :3].tolist() == [0, 255, 0] and (got[1:] == 128).all() and (got[0, 3:] == 128).all()


def test_a_float_image_whose_brightest_sample_is_exactly_1_is_scaled_from_0_to_1():
    """A 0..1 float image holding pure white (its maximum exactly 1.0, as any normalised image's) is scaled to
    0..255 as one whose maximum is below 1: its white decodes to 255, its mid grey to 128."""
    from transferkit.data.sources import decode_image

    eight = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    floats = eight.astype(np.float32) / 255
    assert floats.max() == 1.0
    assert np.array_equal(decode_image(_encode(Image.fromarray(floats), "TIFF"), "f.tif", 32)[0], eight)


def test_a_32_bit_integer_image_shows_values_outside_16_bits_as_black_and_white():
    """A mode I (signed 32-bit) TIFF may hold values below 0 and above 65535: they decode to 0 and 255, the ends
    of the 16-bit range it is scaled from, not the low bits of the value wrapped into 0..255."""
    from transferkit.data.sources import decode_image

    row = np.array([-70000, -1, 0, 32768, 65535, 70000, 2**31 - 1, 256], dtype=np.int32)
    data = _encode(Image.fromarray(np.tile(row, (8, 1))), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert decode_image(data, "i.tif", 8)[0, 0].tolist() == [0, 0, 0, 128, 255, 255, 255, 1]


def test_exif_orientation_is_applied(tmp_path):
    """A phone stores its pixels sideways with EXIF orientation 6 (display rotated 90 degrees clockwise);
    prepare (image folders, JPEG fast path included) and predict see the upright image."""
    from transferkit.data.sources import decode_image
    from transferkit.deploy.predict import decode_images

    ramp = np.linspace(0, 255, 32)
    upright = np.stack([ramp[None, :].repeat(32, 0), ramp[:, None].repeat(32, 1), np.full((32, 32), 90.0)], -1)
    upright = upright.astype(np.uint8)
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    png = _encode(sideways, "PNG", exif=exif.tobytes())
    assert np.array_equal(decode_image(png, "a.png", 32), upright.transpose(2, 0, 1))  # lossless: exact

    jpeg = _encode(sideways, "JPEG", exif=exif.tobytes(), quality=95)
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "0.jpg").write_bytes(jpeg)
    (tmp_path / "p.jpg").write_bytes(jpeg)
    want = upright.transpose(2, 0, 1).astype(int)
    for got in (read_image_folder(root).train.images[0].numpy(), decode_images([tmp_path / "p.jpg"], 32)[0][0]):
        assert np.abs(got.astype(int) - want).mean() < 3  # JPEG tolerance
        assert np.abs(got.astype(int) - np.asarray(sideways).transpose(2, 0, 1)).mean() > 40


@pytest.mark.parametrize("blob", [b"Exif\x00\x00garbage",  # no TIFF header: PIL's EXIF reader raises
                                  b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00"
                                  b"\x00\x00\x06\x00"])  # an orientation entry cut short: read by PIL alone
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_damaged_exif_block_is_read_alike_by_prepare_and_predict(blob, fmt):
    """A photo whose EXIF block is damaged is still a picture: prepare (its batched JPEG decoder too) and
    predict (PIL alone) decode it to the same pixels, instead of refusing it or turning it one way only."""
    from transferkit.data.sources import decode_image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = _encode(image, fmt, exif=blob, **({"quality": 95} if fmt == "JPEG" else {}))
    alone = decode_image(data, "a", 32)
    assert np.array_equal(sources.decode_images([("a", bytearray(data))], 32, "decoding")[0].numpy(), alone)
    if fmt == "PNG":
        assert np.array_equal(alone, np.asarray(image).transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_decode_to_white(mode):
    """Transparent pixels often store black; a viewer shows them on a white page, and so does the decoder."""
    from transferkit.data.sources import decode_image

    rgba = np.zeros((32, 32, 4), np.uint8)  # left half: transparent black
    rgba[:, 16:] = (10, 200, 30, 255) if mode != "LA" else (90, 90, 90, 255)
    img = Image.fromarray(rgba)
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":  # palette with one transparent index, as in GIFs
        img = img.convert("RGB").quantize(4)
        img.info["transparency"] = img.getpixel((0, 0))
    data = _encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    got = decode_image(data, "t.png", 32)
    assert (got[:, :, :16] == 255).all()
    assert got[:, 0, 16].tolist() == ([10, 200, 30] if mode != "LA" else [90, 90, 90])


def test_half_transparent_pixels_blend_with_white():
    from transferkit.data.sources import decode_image

    data = _encode(Image.new("RGBA", (32, 32), (0, 0, 0, 128)), "PNG")
    assert decode_image(data, "t.png", 32)[:, 5, 5].tolist() == [127, 127, 127]


def test_empty_image_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(TransferkitError, match=r"no images found in .*empty as train/<class>/<image> and "
                                               r"test/<class>/<image>\. Fix: arrange the images in that layout"):
        read_image_folder(tmp_path / "empty")


def test_class_folders_without_a_split_are_told_how_to_split(tmp_path):
    """torchvision's ImageFolder layout (class folders alone) was told 'no images found', which is untrue."""
    for name in ("cat", "dog", "frog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        (tmp_path / "pets" / name / "0.png").write_bytes(_encode(Image.new("RGB", (32, 32)), "PNG"))
    with pytest.raises(TransferkitError, match=r"no images found in .*pets as train/<class>/<image> and test/<class>/"
                                               r"<image>\. Fix: .*pets holds class folders alone \(cat, dog, frog\), "
                                               r"with no split: move some of each class's images to test/<class>/ and "
                                               r"the rest to train/<class>/\.$"):
        read_image_folder(tmp_path / "pets")


# ============================================================== corrupt inputs
def test_truncated_archive_names_the_archive(tmp_path):
    path = write_image_folder(tmp_path, CLASSES4, 10, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TransferkitError) as e:
        read_image_folder(path)
    assert str(path) in str(e.value) and "corrupt" in str(e.value)


def test_random_bytes_archive_names_the_archive(tmp_path):
    path = tmp_path / "cifar10-jpeg.tar.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(TransferkitError) as e:
        _load("cifar10", tmp_path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("payload", ["garbage", "truncated"])
def test_corrupt_image_in_folder_names_the_file(tmp_path, payload):
    folder = write_image_folder(tmp_path, CLASSES4, 3, 1, archive=False)
    bad = folder / "train" / "dog" / "0001.jpg"
    good = bad.read_bytes()
    bad.write_bytes(b"this is not a jpeg at all" * 8 if payload == "garbage" else good[: len(good) // 3])
    with pytest.raises(TransferkitError) as e:
        read_image_folder(folder)
    assert str(bad) in str(e.value) and "corrupt image" in str(e.value)
    assert "0x" not in str(e.value)  # PIL names the in-memory buffer it read by its address: nothing to act on


def _cut_png() -> bytes:
    """A PNG cut short inside its second IDAT chunk, as an interrupted download leaves it."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    return data[: data.index(b"IDAT", data.index(b"IDAT") + 4) + 2]


@pytest.mark.parametrize("name, data", [("cut.png", _cut_png()),
                                        ("empty.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")])
def test_a_file_cut_short_is_a_corrupt_image_by_name(name, data):
    """PIL raises SyntaxError for a broken PNG chunk and EOFError for a GIF without a frame: no
    traceback either way."""
    from transferkit.data.sources import decode_image

    with pytest.raises(TransferkitError, match=rf"corrupt image {name} \(.*Fix: leave that file out"):
        decode_image(data, name, 32)


def test_a_decompression_bomb_is_refused_by_name(tmp_path):
    """A PNG whose header claims more pixels than PIL reads: one error naming the file, before anything is
    decoded."""
    import struct
    import zlib

    from transferkit.data.sources import decode_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for width, height in ((20000, 10000), (14000, 12800)):  # 200 and 179.2 million pixels
        bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IEND", b""))
        with pytest.raises(TransferkitError, match=r"image bomb.png has more than 179 million pixels.*Fix: downscale"):
            decode_image(bomb, "bomb.png", 32)


def test_an_image_whose_decoding_would_outgrow_the_memory_bound_is_refused_before_it_is_decoded(monkeypatch):
    """A 657 KB PNG of 13000 x 13000 zeros, under PIL's pixel cap, took 2.5 GB to decode (RGBA copies to lay it
    over white): its decoded size is checked against the bound the file sizes are (memory_limit), from its header."""
    import struct
    import zlib

    import transferkit.data.sources as sources

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header_only = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4000, 3000, 8, 6, 0, 0, 0))
                   + chunk(b"IEND", b""))  # RGBA, no pixels: reading them would fail as corrupt
    with pytest.raises(TransferkitError, match=r"^image big.png \(4000x3000 pixels\) takes about 0.2 GB to decode, "
                                               r"more than the 0.1 GB one image may take here.*Fix: downscale it"):
        sources.decode_image(header_only, "big.png", 32, max_bytes=100_000_000)
    monkeypatch.setattr(sources, "memory_limit", lambda: 100_000_000)  # the default bound: predict's, prepare's
    with pytest.raises(TransferkitError, match=r"image big.png \(4000x3000 pixels\) takes about 0.2 GB"):
        sources.decode_image(header_only, "big.png", 32)
    with pytest.raises(TransferkitError, match=r"corrupt image big.png"):  # within the bound: read, and corrupt
        sources.decode_image(header_only, "big.png", 32, max_bytes=200_000_000)


def test_the_images_decoded_at_once_share_the_memory_bound(monkeypatch):
    """prepare decodes up to 16 parts in threads at once: each image within memory_limit alone, 16 at the bound
    would take four times the process's memory. An image may take its thread's share."""
    import struct
    import zlib

    import transferkit.data.sources as sources

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header_only = bytearray(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4000, 3000, 8, 6, 0, 0, 0))
                            + chunk(b"IEND", b""))  # 0.19 GB to decode, under the bound, over a quarter of it
    monkeypatch.setattr(sources, "memory_limit", lambda: 400_000_000)
    monkeypatch.setattr(sources, "PART_FILES", 1)
    for threads, error in ((4, r"takes about 0.2 GB to decode, more than the 0.1 GB one image may take here"),
                           (1, r"corrupt image big.png")):  # alone, it is read (and has no pixels)
        monkeypatch.setattr(os, "cpu_count", lambda: threads)
        with pytest.raises(TransferkitError, match=error):
            sources.decode_images([("big.png", header_only)] * 4, 32, "decoding")


def test_a_postscript_file_by_any_name_is_no_image_and_runs_nothing(tmp_path, monkeypatch):
    """PIL picks a reader by the file's content: an EPS named x.png went to its EPS reader, which runs
    Ghostscript (`gs`, here a stub that leaves a mark) on the file's PostScript."""
    from PIL import EpsImagePlugin

    from transferkit.data.sources import decode_image

    gs = tmp_path / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\n[ \"$1\" = --version ] && echo 10.0\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # found on first use
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n"
    with pytest.raises(TransferkitError, match=r"corrupt image x.png \(no image format PIL reads\)"):
        decode_image(eps, "x.png", 32)
    assert not (tmp_path / "ran").exists()


def test_an_image_above_the_pixels_pil_warns_about_decodes_without_its_warning(tmp_path):
    """An image of 90 million pixels, under the limit, printed PIL's DecompressionBombWarning, two lines of it
    among predict's results."""
    import subprocess
    import sys

    Image.new("L", (9500, 9500)).save(tmp_path / "big.png")
    code = ("import sys; from transferkit.data.sources import decode_image; "
            "print(decode_image(open(sys.argv[1], 'rb').read(), 'big.png', 32).shape)")
    proc = subprocess.run([sys.executable, "-c", code, tmp_path / "big.png"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == "(3, 32, 32)\n" and proc.stderr == "", proc.stderr


def test_corrupt_image_in_archive_names_the_member(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("top/train/a/0.jpg", b"nope" * 30), ("top/test/a/0.jpg", b"nope")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(TransferkitError, match="top/test/a/0.jpg|top/train/a/0.jpg"):
        read_image_folder(path)


# ============================================================== missing dataset
@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_dataset_names_all_three_ways(tmp_path, name, folder):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(TransferkitError) as e:
        _load(name, empty)
    msg = str(e.value)
    assert f"{empty}/{folder}" in msg  # (1) official pickles
    assert "data.download=true" in msg
    assert f"{name}-jpeg.tar.gz" in msg  # (2)
    assert "../shared" not in msg  # a folder of this project's machines: meaningless to users
    assert "experiment=smoke" in msg  # (3)
    assert "data.download=false" in msg  # why nothing was attempted


def test_failed_download_gives_the_same_advice(tmp_path, monkeypatch):
    def offline(name, data_dir):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(resolve, "download_cifar", offline)
    with pytest.raises(TransferkitError) as e:
        _load("cifar10", tmp_path, download=True)
    msg = str(e.value)
    assert "download failed" in msg and "Network is unreachable" in msg
    assert "cifar10-jpeg.tar.gz" in msg and "experiment=smoke" in msg


def test_a_download_gives_up_on_a_silent_network_and_leaves_the_socket_timeout_as_it_was(monkeypatch):
    """download_cifar waits a bounded time on the network (an offline machine fails in seconds, not never), and the
    process's default socket timeout is the caller's again afterwards, when the download fails too."""
    import socket

    import torchvision.datasets.utils

    from transferkit.data.cifar import download_cifar

    seen = []

    def unreachable(url, download_root, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", unreachable)
    before = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(None)
        with pytest.raises(OSError, match="unreachable"):
            download_cifar("cifar10", Path("unused"))
        assert seen and seen[0] is not None and 0 < seen[0] <= 60, seen
        assert socket.getdefaulttimeout() is None
    finally:
        socket.setdefaulttimeout(before)


def test_a_file_where_the_official_folder_goes_does_not_hide_the_image_archive(tmp_path):
    """cifar10 is the official folder cifar-10-batches-py/ when there is one; a file of that name (a download
    saved under it) is no such folder, and the image archive beside it is what is read."""
    (tmp_path / "cifar-10-batches-py").write_bytes(b"not the extracted release")
    write_image_folder(tmp_path, CLASSES4, train_per_class=2, test_per_class=1)
    raw = _load("cifar10", tmp_path)
    assert raw.classes == CLASSES4 and len(raw.train.labels) == 2 * len(CLASSES4)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(TransferkitError, match="neither"):
        _load("cifar11", tmp_path)


# ============================================================== task selection
RAW_CLASSES = ["ant", "bee", "cat", "dog", "eel"]
N_TRAIN, N_TEST = 20, 6


def _tagged_raw() -> RawDataset:
    """Every image carries its split (pixel [0,0,0]) and its index (pixels [1,0,0], [2,0,0])."""
    def split(n_per_class: int, tag: int) -> Split:
        n = n_per_class * len(RAW_CLASSES)
        images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
        images[:, 0, 0, 0] = tag
        images[:, 1, 0, 0] = torch.arange(n) // 256
        images[:, 2, 0, 0] = torch.arange(n) % 256
        return Split(images, torch.arange(n) % len(RAW_CLASSES))  # classes interleaved

    return RawDataset("tagged", list(RAW_CLASSES), split(N_TRAIN, 0), split(N_TEST, 1))


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 1, 0, 0].long() * 256 + x[:, 2, 0, 0].long()).tolist()


def _select(raw, classes=("dog", "ant"), seed=0, **kw):
    args = dict(train_per_class=6, val_per_class=4, test_per_class=3, seed=seed, role="target")
    args.update(kw)
    return select_task(raw, list(classes), **args)


def test_select_task_classes_counts_and_disjoint_splits():
    raw = _tagged_raw()
    task = _select(raw)
    assert task["classes"] == ["dog", "ant"] and task["dataset"] == "tagged"
    assert task_summary(task) == {"dataset": "tagged", "classes": ["dog", "ant"],
                                  "n_train": 12, "n_val": 8, "n_test": 6}
    for split, per in (("train", 6), ("val", 4), ("test", 3)):
        assert torch.bincount(task[f"{split}_y"], minlength=2).tolist() == [per, per]
        assert task[f"{split}_x"].dtype == torch.uint8 and task[f"{split}_y"].dtype == torch.int64
    # labels follow the config order: 0 = dog, 1 = ant, whatever the raw indices are
    for split, source, tag in (("train", raw.train, 0), ("val", raw.train, 0), ("test", raw.test, 1)):
        x, y = task[f"{split}_x"], task[f"{split}_y"]
        assert (x[:, 0, 0, 0] == tag).all()  # train/val from the train split, test from test
        raw_labels = source.labels[_ids(x)]
        expected = torch.where(y == 0, RAW_CLASSES.index("dog"), RAW_CLASSES.index("ant"))
        assert torch.equal(raw_labels, expected)
    train_ids, val_ids = _ids(task["train_x"]), _ids(task["val_x"])
    assert len(set(train_ids)) == 12 and len(set(val_ids)) == 8
    assert not set(train_ids) & set(val_ids)


def test_select_task_is_seeded():
    raw = _tagged_raw()
    a, b, c = _select(raw, seed=3), _select(raw, seed=3), _select(raw, seed=4)
    for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(a[k], b[k])
    assert _ids(a["train_x"]) != _ids(c["train_x"])


def test_select_task_all_remaining_for_training():
    task = _select(_tagged_raw(), train_per_class=None, val_per_class=5, test_per_class=None)
    assert torch.bincount(task["train_y"]).tolist() == [N_TRAIN - 5] * 2
    assert torch.bincount(task["test_y"]).tolist() == [N_TEST] * 2
    assert not set(_ids(task["train_x"])) & set(_ids(task["val_x"]))


def test_a_class_whose_val_split_takes_every_train_image_is_an_error():
    """train_per_class null trains on what remains after val_per_class: a class with no more train images than
    val_per_class would train on none, so it is refused; one image more leaves one to train on."""
    with pytest.raises(TransferkitError, match=rf"class 'dog' has {N_TRAIN} train images in tagged, but data.target "
                                               rf"asks for {N_TRAIN} val and at least 1 train\. Fix: lower "
                                               rf"data.target.val_per_class\.$"):
        _select(_tagged_raw(), train_per_class=None, val_per_class=N_TRAIN)
    task = _select(_tagged_raw(), train_per_class=None, val_per_class=N_TRAIN - 1)
    assert torch.bincount(task["train_y"]).tolist() == [1, 1]
    assert torch.bincount(task["val_y"]).tolist() == [N_TRAIN - 1] * 2


def test_test_per_class_may_take_every_test_image_of_a_class():
    """test_per_class equal to a class's test images takes them all, in file order (as null does); one more is an
    error naming the class."""
    raw = _tagged_raw()
    every = _select(raw, test_per_class=N_TEST)
    assert torch.bincount(every["test_y"]).tolist() == [N_TEST] * 2
    assert _ids(every["test_x"]) == _ids(_select(raw, test_per_class=None)["test_x"])
    with pytest.raises(TransferkitError, match=rf"class 'dog' has {N_TEST} test images, data.target.test_per_class "
                                               rf"is {N_TEST + 1}"):
        _select(raw, test_per_class=N_TEST + 1)


def test_test_per_class_is_a_seeded_draw_of_each_classs_test_images_in_file_order():
    """test_per_class images of a class are drawn by a seeded shuffle of its test images (the first ones in file
    order may be one photo session), then kept in file order: one seed draws the same images every time,
    other seeds other images, not always the first ones."""
    raw = _tagged_raw()
    firsts = [i for c in ("dog", "ant") for i in torch.nonzero(raw.test.labels == RAW_CLASSES.index(c)).flatten()[:3]
              .tolist()]
    draws = [_ids(_select(raw, seed=seed, test_per_class=3)["test_x"]) for seed in range(4)]
    assert _ids(_select(raw, seed=0, test_per_class=3)["test_x"]) == draws[0]
    assert len({tuple(d) for d in draws}) > 1 and any(d != firsts for d in draws)
    for d in draws:
        assert d[:3] == sorted(d[:3]) and d[3:] == sorted(d[3:])


def test_train_sample_takes_images_of_every_class():
    """train_sample (quantize's calibration images, taylor's gradients) spreads its images over the train
    split, which is sorted by class: its first images would all be of one class."""
    from transferkit.data.tasks import train_sample

    task = _select(_tagged_raw(), train_per_class=6)  # 6 of dog, then 6 of ant
    x, y = train_sample(task, 4)
    assert torch.bincount(y, minlength=2).tolist() == [2, 2]
    assert all(any(torch.equal(img, t) and int(label) == int(lt) for t, lt in zip(task["train_x"], task["train_y"]))
               for img, label in zip(x, y))


def test_unknown_class_suggests_close_match():
    with pytest.raises(TransferkitError) as e:
        _select(_tagged_raw(), classes=("dgo", "ant"))
    msg = str(e.value)
    assert "'dgo'" in msg and "Did you mean ['dog']" in msg and "data.target.classes" in msg


def test_too_many_samples_names_class_and_keys():
    with pytest.raises(TransferkitError) as e:
        _select(_tagged_raw(), train_per_class=18, val_per_class=4)
    msg = str(e.value)
    assert "'dog'" in msg and "20 train images" in msg
    assert "data.target.train_per_class" in msg and "data.target.val_per_class" in msg
    with pytest.raises(TransferkitError, match="'dog'.*test_per_class"):
        _select(_tagged_raw(), test_per_class=N_TEST + 1)


def test_a_class_without_test_images_beside_classes_with_some_is_an_error(tmp_path):
    """An image folder whose test/dog/ is missing: the task's test score would be the other
    classes' alone. A dataset with no test split at all stays allowed for the source task (pretraining
    needs none), never for the target."""
    folder = write_image_folder(tmp_path, ["cat", "dog", "fox"], 10, 3, archive=False)
    (folder / "test" / "dog").rename(folder / "test" / "Dog")  # named otherwise than train/dog/: offered
    raw = read_image_folder(folder)
    with pytest.raises(TransferkitError, match=r"classes \['dog'\] of data.target.classes have no test images "
                                               r".* \(folders of near names: \{'dog': \['Dog'\]\}\)\. Fix: add "
                                               r"test/<class>/ images for them"):
        select_task(raw, ["cat", "dog"], train_per_class=8, val_per_class=2, test_per_class=None, seed=0,
                    role="target")
    assert len(select_task(raw, ["cat", "fox"], train_per_class=8, val_per_class=2, test_per_class=None, seed=0,
                           role="target")["test_y"]) == 6
    shutil.rmtree(folder / "test")
    no_test = select_task(read_image_folder(folder), ["cat", "dog"], train_per_class=8, val_per_class=2,
                          test_per_class=None, seed=0, role="source")
    assert len(no_test["test_y"]) == 0 and len(no_test["train_y"]) == 16
    # the target's test images are what evaluate scores every model on: refused now, not after training
    with pytest.raises(TransferkitError, match=r"data.target.classes have no test images.*Fix: add test/<class>/"):
        select_task(read_image_folder(folder), ["cat", "dog"], train_per_class=8, val_per_class=2,
                    test_per_class=None, seed=0, role="target")


@pytest.mark.parametrize("how", ["link", "copy", "archived link"])
def test_a_test_folder_that_is_its_train_folder_is_an_error(tmp_path, how):
    """test/dog/ linked to (or copied from) train/dog/, as one does to make a tool run that wants a test split: every
    model's test score would be a score on its training images. A test image that is also a train image (datasets
    hold a few such duplicates) is no such fault."""
    folder = write_image_folder(tmp_path / "d", ["cat", "dog", "fox"], 10, 3, archive=False)
    shutil.copy(folder / "train" / "cat" / "0004.jpg", folder / "test" / "cat" / "0000.jpg")
    shutil.copy(folder / "train" / "cat" / "0007.jpg", folder / "test" / "cat" / "0002.jpg")
    shutil.rmtree(folder / "test" / "dog")
    if how == "copy":
        shutil.copytree(folder / "train" / "dog", folder / "test" / "dog")
    else:
        (folder / "test" / "dog").symlink_to(Path("..", "train", "dog"))
    path = Path(shutil.make_archive(str(tmp_path / "a"), "gztar", folder)) if how == "archived link" else folder
    raw = read_image_folder(path)
    with pytest.raises(TransferkitError, match=r"every test image of class 'dog' in .* is also one of its train images "
                                               r"\(test/dog/ a link to or a copy of train/dog/\).*Fix: give test/dog/"):
        select_task(raw, ["cat", "dog"], train_per_class=8, val_per_class=2, test_per_class=None, seed=0,
                    role="target")
    task = select_task(raw, ["cat", "fox"], train_per_class=8, val_per_class=2, test_per_class=None, seed=0,
                       role="target")
    assert len(task["test_y"]) == 6


def _ships_to_cats(folder: Path, tmp_path: Path, train: int, val: int, *more: str):
    """The smoke experiment on the image folder `folder`: ship and truck the source, cat and dog the target, `train`
    and `val` images of each class (`more`: further overrides)."""
    from conftest import compose

    return compose("experiment=smoke", f"data.source.dataset={folder}", f"data.target.dataset={folder}",
                   "data.source.classes=[ship,truck]", "data.target.classes=[cat,dog]",
                   *(f"data.{role}.{split}_per_class={n}" for role in ("source", "target")
                     for split, n in (("train", train), ("val", val))), *more, tmp=tmp_path)


def test_prepare_draws_each_classs_train_and_val_images_by_the_runs_seed(tmp_path):
    """The train/val split is a seeded draw of each class's train images: another `seed` draws other val images
    from the same dataset (runs over seeds vary the split as well as the training), the same seed the same ones."""
    from conftest import run
    from transferkit.stages.common import load_task

    folder = write_image_folder(tmp_path / "d", ["cat", "dog", "ship", "truck"], 8, 2, archive=False)
    tasks = []
    for seed, where in ((0, "a"), (1, "b"), (0, "c")):
        run("prepare", _ships_to_cats(folder, tmp_path / where, 4, 4, f"seed={seed}"))
        tasks.append(load_task(tmp_path / where / "artifacts" / "prepare", "target"))
    first, other, again = tasks
    assert torch.equal(first["val_x"], again["val_x"]) and torch.equal(first["train_x"], again["train_x"])
    assert not torch.equal(first["val_x"], other["val_x"])
    pooled = [sorted(map(bytes, torch.cat([t["train_x"], t["val_x"]]).flatten(1).numpy())) for t in (first, other)]
    assert pooled[0] == pooled[1]  # the same images, split another way


def test_prepare_counts_the_val_images_that_are_also_train_images(tmp_path, capsys):
    """A class's duplicate images can be drawn into train and val both: prepare says how many val images the
    model trains on, since val accuracy chooses checkpoints and sweep settings."""
    from conftest import run

    folder = write_image_folder(tmp_path / "d", ["cat", "dog", "ship", "truck"], 6, 3, archive=False)
    for i in range(1, 6):  # every dog a copy of the first: whichever are drawn, train and val share it
        shutil.copy(folder / "train" / "dog" / "0000.jpg", folder / "train" / "dog" / f"{i:04d}.jpg")
    cfg = _ships_to_cats(folder, tmp_path, train=4, val=2)
    run("prepare", cfg)
    err = capsys.readouterr().err
    assert "prepare: 2 of the target task's 4 val images are also its train images (pixel for pixel: the dataset's " \
           "own duplicates)" in err and f"Fix: remove the duplicates from the train split of {folder}." in err, err
    assert "source task's 4 val images" not in err, err


def test_a_class_in_both_tasks_from_the_official_release_and_its_image_folder_copy_is_refused(tmp_path):
    """source: cifar10 (the official pickles in data/); target: the JPEG archive beside them, by its path. They hold
    the same photos, which no pixel hash matches (JPEG), so the shared-class check covers them as one dataset
    (walk H84)."""
    from conftest import compose, run

    data = tmp_path / "data"
    write_cifar_pickles(data, "cifar10", CIFAR10_CLASSES, 5, 2)
    archive = write_image_folder(data, CIFAR10_CLASSES, 5, 2)
    shared = ("data.source.dataset=cifar10", "data.verify_checksums=false", "data.download=false",
              f"paths.data_dir={data}", *(f"data.{role}.{split}_per_class={n}" for role in ("source", "target")
                                          for split, n in (("train", 3), ("val", 1))))
    for target in (str(archive), "cifar10-jpeg.tar.gz"):  # by its path, or by its name in data/
        cfg = compose("experiment=smoke", *shared, f"data.target.dataset={target}", "data.source.classes=[ship,cat]",
                      "data.target.classes=[cat,dog]", tmp=tmp_path)
        with pytest.raises(TransferkitError, match=r"^classes \['cat'\] are in both data.source.classes and "):
            run("prepare", cfg)
    cfg = compose("experiment=smoke", *shared, f"data.target.dataset={archive}", "data.source.classes=[ship,truck]",
                  "data.target.classes=[cat,dog]", tmp=tmp_path)
    assert run("prepare", cfg)["target"]["n_train"] == 6  # no class shared: prepared


def test_a_missing_target_dataset_fails_before_the_source_is_decoded(tmp_path, monkeypatch):
    """experiment=seed_aquatic offline with CIFAR-10 only: CIFAR-100 is found missing before minutes of decoding
    CIFAR-10 (walk H84), and nothing is written."""
    from conftest import compose, run

    write_image_folder(tmp_path / "data", CLASSES4, 2, 1)  # cifar10-jpeg.tar.gz
    monkeypatch.setattr(resolve, "read_image_folder", lambda *a, **k: pytest.fail("decoded before the check"))
    cfg = compose("experiment=smoke", "data.source.dataset=cifar10", "data.target.dataset=cifar100",
                  f"data.source.classes=[{CLASSES4[0]},{CLASSES4[1]}]", "data.target.classes=[beaver,otter]",
                  "data.download=false",
                  f"paths.data_dir={tmp_path / 'data'}", tmp=tmp_path)
    with pytest.raises(TransferkitError, match=r"^CIFAR100 not found in .*data/ and not downloadable "
                                               r"\(data.download=false\)"):
        run("prepare", cfg)
    assert not (Path(cfg.paths.artifacts_dir) / "prepare").exists()


def test_prepare_counts_the_target_train_images_the_source_task_trained_on(tmp_path, capsys):
    """One dataset given twice (a folder and its archive) escapes the shared-class check, which compares where
    the datasets lie: a class in both tasks puts the target's train images into pretraining, and transfer's gain
    over scratch would count images the backbone already learned. prepare says how many, as it does for test."""
    from conftest import compose, run

    folder = write_image_folder(tmp_path / "d", ["cat", "dog", "ship", "fox"], 6, 3, archive=False)
    archive = Path(shutil.make_archive(str(tmp_path / "copy"), "gztar", folder))
    cfg = compose("experiment=smoke", f"data.source.dataset={folder}", f"data.target.dataset={archive}",
                  "data.source.classes=[ship,cat]", "data.target.classes=[cat,dog]",
                  *(f"data.{role}.{split}_per_class={n}" for role in ("source", "target")
                    for split, n in (("train", 5), ("val", 1))), tmp=tmp_path)
    run("prepare", cfg)
    err = capsys.readouterr().err
    assert "prepare: 5 of the target task's 10 train images are also source training images (pixel for pixel, in " \
           "the source task's train or val split)" in err and "Fix: take the target task's classes from other " \
           "images than the source task's" in err, err
    cfg = compose("experiment=smoke", f"data.source.dataset={folder}", f"data.target.dataset={archive}",
                  "data.source.classes=[ship,fox]", "data.target.classes=[cat,dog]",
                  *(f"data.{role}.{split}_per_class={n}" for role in ("source", "target")
                    for split, n in (("train", 5), ("val", 1))), tmp=tmp_path / "disjoint")
    run("prepare", cfg)
    assert "source training images" not in capsys.readouterr().err


def test_prepare_counts_the_test_images_that_are_also_training_images(tmp_path, capsys):
    """A few copies in test/ (a dataset's own duplicates, or a slip) pass, and prepare says how many: a target test
    image that is a source train image counts too, as the backbone trained on it."""
    from conftest import run

    folder = write_image_folder(tmp_path / "d", ["cat", "dog", "ship", "truck"], 6, 3, archive=False)
    shutil.copy(folder / "train" / "cat" / "0001.jpg", folder / "test" / "cat" / "0000.jpg")
    shutil.copy(folder / "train" / "ship" / "0002.jpg", folder / "test" / "dog" / "0001.jpg")  # source -> target
    shutil.copy(folder / "train" / "truck" / "0005.jpg", folder / "test" / "truck" / "0000.jpg")
    cfg = _ships_to_cats(folder, tmp_path, train=5, val=1)
    run("prepare", cfg)
    err = capsys.readouterr().err
    assert "prepare: 1 of the source task's 6 test images are also training images (pixel for pixel, in the source " \
           "task's train or val split)" in err, err
    assert "prepare: 2 of the target task's 6 test images are also training images (pixel for pixel, in the source " \
           "or target task's train or val split)" in err and "Fix: remove those copies" in err, err
    assert "val images are also" not in err, err
    # the counts outlive the warning: summary.json holds them, and the report's target line says so
    from transferkit.evaluation.report import render

    summary = json.loads((Path(cfg.paths.artifacts_dir) / "prepare" / "summary.json").read_text())
    assert summary["source"]["test_seen_in_training"] == 1 and summary["target"]["test_seen_in_training"] == 2
    assert not {"val_seen_in_train", "train_seen_in_source"} & {*summary["source"], *summary["target"]}, summary
    m = {"top1": .5, "top1_ci95": [.4, .6], "params": 1, "macs": 1, "size_bytes": 1, "per_class": {"cat": .5}}
    run_cfg = {"experiment": "x", "model": "fastnet", "freeze_depth": 0, "backbone_lr_mult": 1, "probe_depth": None,
               "epochs": dict.fromkeys(["pretrain", "transfer", "scratch", "probe", "distill"], 1), "seed": 0,
               "tta": "none", "tta_views": 1, "blocks": 4}
    assert "**6 test** images); **2 test images are also training images** (pixel for pixel, as prepare warned)" \
        in render(run_cfg, {"models": {"scratch": m}}, {}, summary)
    shutil.rmtree(Path(cfg.paths.artifacts_dir))
    for copy in ("cat/0000.jpg", "dog/0001.jpg", "truck/0000.jpg"):
        (folder / "test" / copy).unlink()
    run("prepare", cfg)
    assert "training images" not in capsys.readouterr().err
    assert "seen_in" not in (Path(cfg.paths.artifacts_dir) / "prepare" / "summary.json").read_text()  # as before


def test_duplicated_or_single_class_is_an_error():
    with pytest.raises(TransferkitError, match="more than once"):
        _select(_tagged_raw(), classes=("dog", "ant", "dog"))
    with pytest.raises(TransferkitError, match="at least 2"):
        _select(_tagged_raw(), classes=("dog",))


# ============================================================== synthetic
def test_synthetic_is_deterministic_and_shaped():
    a = make_synthetic(["x", "y", "z"], 8, 4, image_size=32, seed=0)
    b = make_synthetic(["x", "y", "z"], 8, 4, image_size=32, seed=0)
    c = make_synthetic(["x", "y", "z"], 8, 4, image_size=32, seed=1)
    assert a.classes == ["x", "y", "z"] and a.name == "synthetic"
    assert a.train.images.shape == (24, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert a.test.images.shape == (12, 3, 32, 32)
    assert a.train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert make_synthetic(["x", "y"], 2, 1, image_size=16).train.images.shape == (4, 3, 16, 16)


def test_synthetic_classes_differ_visibly():
    raw = make_synthetic(["x", "y", "z"], 16, 2, seed=0)
    means = [raw.train.images[raw.train.labels == i].float().mean(0) for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (means[i] - means[j]).abs().mean() > 5, (i, j)
    # images of one class are not all identical (random phase + noise)
    cls0 = raw.train.images[raw.train.labels == 0].float()
    assert (cls0[0] - cls0[1]).abs().mean() > 1


# ============================================================== augmentation
def _batch(n=64, seed=0, size=8):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_flip_mirrors_exactly_the_masked_images():
    x = _batch(400).float()
    mask = draw_flips(len(x), torch.Generator().manual_seed(0), "cpu")
    y = flip(x, mask)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[mask], x[mask].flip(-1)) and torch.equal(y[~mask], x[~mask])
    assert 0.4 < mask.float().mean() < 0.6
    assert torch.equal(mask, draw_flips(len(x), torch.Generator().manual_seed(0), "cpu"))
    assert not torch.equal(mask, draw_flips(len(x), torch.Generator().manual_seed(1), "cpu"))


def test_translate_is_the_crop_of_the_reflect_padded_image_at_the_drawn_shift():
    pad, h = 2, 8
    x = _batch(100, seed=1, size=h).float()
    shifts = draw_shifts(len(x), pad, torch.Generator().manual_seed(0), "cpu")
    y = translate(x, shifts, pad)
    assert y.shape == x.shape and y.dtype == x.dtype
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    for i, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(y[i], padded[i, :, dy:dy + h, dx:dx + h]), f"image {i}"
    assert len({tuple(s) for s in shifts.tolist()}) >= 20  # the 25 possible shifts are used
    assert torch.equal(translate(x, torch.full((len(x), 2), pad), pad), x)  # no shift: the image itself


def test_augment_keeps_float_batch_shape_and_is_identity_when_off():
    x = torch.rand(8, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    y = augment(x, draw_flips(8, gen, "cpu"), draw_shifts(8, 1, gen, "cpu"), 1)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(augment(x, None, None, 0), x)


def test_augment_has_no_host_synchronisation():
    """Graph capture fails on anything that needs a value from the device in Python (.item(),
    a data-dependent `if`, boolean-mask indexing): fullgraph=True proves there is none."""
    compiled = torch.compile(augment, fullgraph=True, backend="eager", dynamic=False)
    x = torch.rand(16, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    mask, shifts = draw_flips(16, gen, "cpu"), draw_shifts(16, 2, gen, "cpu")
    assert torch.equal(compiled(x, mask, shifts, 2), augment(x, mask, shifts, 2))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    """A photo decoded at full size, 12 million pixels to make 32 x 32, took 6x the time and 64x the memory: the
    JPEG decoder scales by 1/2 to 1/8 on the way (to twice the size at least), as PIL's thumbnail() does."""
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:768, 0:1024]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    seen = []
    to_rgb = sources._to_rgb
    monkeypatch.setattr(sources, "_to_rgb", lambda img: seen.append(img.size) or to_rgb(img))
    got = sources.decode_image(buf.getvalue(), "photo.jpg", 32)
    assert seen == [(128, 96)]  # 1/8 scale: 64 x 64 at least
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert np.abs(got.astype(int) - full.transpose(2, 0, 1).astype(int)).mean() < 2  # what a resize to 32 keeps


def _batches(n=40, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    args = dict(device="cpu", train=True, seed=0, channels_last=False)
    return DeviceBatches(images, torch.arange(n), **{**args, **kw})


@pytest.mark.parametrize("train", [True, False])
def test_a_split_smaller_than_the_processes_is_one_error(train):
    """3 images, 4 DDP ranks: the training shards were empty (a fit of no steps, which 'succeeded'), and a rank
    without validation images skipped the collectives of the others' validation, which then waited for ever."""
    from transferkit.errors import TransferkitError

    with pytest.raises(TransferkitError, match="a split of 3 images cannot be shared by 4 training processes"):
        _batches(n=3, batch_size=8, train=train, rank=3, world_size=4)
    assert len(_batches(n=4, batch_size=8, train=train, rank=3, world_size=4)) == 1


def test_device_batches_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    b = _batches(batch_size=8)
    assert len(b) == 5
    labels = torch.cat([y for _, y in b])
    assert sorted(labels.tolist()) == list(range(40))
    again = torch.cat([y for _, y in _batches(batch_size=8)])
    other_epoch = torch.cat([y for _, y in _batches(batch_size=8, epoch=lambda: 1)])
    other_seed = torch.cat([y for _, y in _batches(batch_size=8, seed=1)])
    assert torch.equal(labels, again) and not torch.equal(labels, other_epoch)
    assert not torch.equal(labels, other_seed)
    for x, y in b:  # images stay paired with their labels through the gather
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)


def test_device_batches_shard_across_ranks_and_drop_the_remainder():
    shards = [torch.cat([y for _, y in _batches(n=41, batch_size=4, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 20  # 41 // 2 each, in whole batches of 4
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    evals = [torch.cat([y for _, y in _batches(n=41, batch_size=8, train=False, rank=r, world_size=2)])
             for r in (0, 1)]
    assert sorted(torch.cat(evals).tolist()) == list(range(41))  # evaluation sees every image once
    assert torch.equal(torch.cat([y for _, y in _batches(n=10, batch_size=4, train=False)]), torch.arange(10))


@pytest.mark.parametrize("n, world_size, batch_size, sizes", [(41, 2, 8, [8, 8]), (5, 2, 8, [2])])
def test_every_training_batch_of_every_rank_has_one_size(n, world_size, batch_size, sizes):
    """Each rank's training shard is n // world_size images, served in whole batches only (the rest dropped; a
    batch larger than the shard shrinks to it): every step of every rank has the same shape."""
    for rank in range(world_size):
        assert [len(y) for _, y in _batches(n=n, batch_size=batch_size, rank=rank, world_size=world_size)] == sizes


def test_a_batch_the_settings_do_not_show_is_said():
    """A split smaller than the batch trains in one smaller batch, and DDP's processes each take a batch (more
    images a step, fewer steps an epoch): the fit says so, where one process trains on the batch asked for, not."""
    from transferkit.data.loader import DeviceBatches, batch_note

    def note(n, batch_size, world_size=1):
        batches = DeviceBatches(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                                batch_size, device="cpu", train=True, world_size=world_size)
        return batch_note("transfer.batch_size", batch_size, batches)

    assert note(72, 16) is None and note(72, 72) is None
    assert note(72, 100000) == "transfer.batch_size=100000 is more than the 72 training images: it trains on " \
                               "batches of 72."
    assert note(72, 16, 2) == ("2 processes train on batches of 16 each, 32 a step together: 2 steps an epoch "
                               "on 64 of the 72 images, against 4 on 64 in one process, at the same learning rate "
                               "(transfer.batch_size is per process; conf/trainer/ddp.yaml says how to keep one "
                               "process's recipe).")
    assert note(72, 64, 2).startswith("transfer.batch_size=64 is more than the 36 training images a process: it "
                                      "trains on batches of 36; 2 processes train on batches of 36 each, 72 a step "
                                      "together: 1 step an epoch on 72 of the 72 images, against 1 on 64 in one "
                                      "process")
    # a shard's remainder sits out (walk L86): 160 images, 2 x 32 a step, 128 an epoch where one process takes 160
    assert "2 steps an epoch on 128 of the 160 images, against 5 on 160 in one process" in note(160, 32, 2)


def test_each_rank_draws_its_own_augmentation_and_rank_0_draws_as_one_process(monkeypatch):
    """Under DDP the ranks share the epoch's permutation (disjoint shards) but not its flips and shifts:
    with one generator for both, the i-th image of every rank's batch was flipped and shifted alike."""
    from transferkit.data import loader

    drawn = []
    for name in ("draw_flips", "draw_shifts"):
        draw = getattr(loader, name)
        monkeypatch.setattr(loader, name, lambda *a, draw=draw: drawn.append(draw(*a)) or drawn[-1])

    def draws(rank: int, world_size: int) -> tuple[list[int], list[torch.Tensor]]:
        drawn.clear()
        labels = [int(i) for _, y in _batches(n=64, batch_size=8, flip="random", translate=2, rank=rank,
                                              world_size=world_size) for i in y]
        return labels, list(drawn)

    (_, alone_draws), (rank0, draws0), (rank1, draws1) = draws(0, 1), draws(0, 2), draws(1, 2)
    assert not set(rank0) & set(rank1) and len(draws0) == len(draws1) == 8  # 4 batches: flips and shifts
    assert not any(torch.equal(a, b) for a, b in zip(draws0, draws1))
    assert all(torch.equal(a, b) for a, b in zip(draws0, alone_draws))  # rank 0 draws on as one process does


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    n = 64
    images = torch.rand(n, 3, 4, 4).mul(255).round().to(torch.uint8)
    ref = images.float() / 255

    def flipped(epoch, seed=3):
        b = DeviceBatches(images, torch.arange(n), 16, device="cpu", train=True, flip="alternating",
                          seed=seed, epoch=lambda: epoch, channels_last=False)
        out = torch.zeros(n, dtype=torch.bool)
        for x, y in b:
            out[y] = (x != ref[y]).flatten(1).any(1)
        return out

    even, odd = flipped(0), flipped(1)
    assert torch.equal(even, ~odd) and torch.equal(even, flipped(2))
    assert 0.3 < even.float().mean() < 0.7
    assert not torch.equal(even, flipped(0, seed=4))  # the half mirrored is the seed's draw


# ============================================================== atomic writes
def test_atomic_path_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            assert tmp.parent == target.parent and tmp != target
            raise RuntimeError("stage crashed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left


def test_a_file_name_longer_than_the_file_system_holds_is_named_as_the_problem(tmp_path):
    """A sweep of many overrides names each point's params file by them: 'cannot write to .../params: File name too
    long. Fix: make it a writable folder, or write elsewhere (--out DIR)' blamed a writable folder, and neither fix
    shortens a name."""
    from transferkit.io import save_text

    long_name = tmp_path / "params" / ("seed=0," + "scratch.lr=0.05," * 20 + ".yaml")
    with pytest.raises(TransferkitError, match=r"cannot write .*scratch.lr=0.05.*: File name too long. Fix: give it "
                                               r"a shorter name \(a sweep names each point by the overrides given"):
        save_text("seed: 0\n", long_name)
    assert not long_name.parent.exists() or not any(long_name.parent.iterdir())


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "deep" / "er" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the body finished
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc (Linux)")
def test_atomic_path_syncs_the_bytes_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A power cut after a rename whose file was never synced can leave an empty file in place of the old one."""
    target, events = tmp_path / "out.json", []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_json({"a": 1}, target)
    tmp = events[1][1]
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".out.json.")
    assert json.loads(target.read_text()) == {"a": 1}


def test_a_folder_that_cannot_be_synced_leaves_the_finished_write_in_place(tmp_path, monkeypatch):
    """The file is renamed into place before its folder is synced: a folder this user may write but not read (or a
    network file system that syncs no folder) made a finished write an error naming a fix that does not apply."""
    from transferkit import io as tk_io

    to_disk = tk_io.to_disk

    def no_folders(path, *flags):
        if path.is_dir():
            raise PermissionError(13, "Permission denied")
        to_disk(path, *flags)

    monkeypatch.setattr(tk_io, "to_disk", no_folders)
    save_json({"a": 1}, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}


def test_save_json_sorted_readable_normal_permissions(tmp_path):
    target = tmp_path / "m.json"
    save_json({"b": 1, "a": {"z": 2, "y": [1, 2]}}, target)
    text = target.read_text()
    assert json.loads(text) == {"a": {"y": [1, 2], "z": 2}, "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.index('"y"') < text.index('"z"')
    assert text.endswith("\n") and "\n  " in text  # indented, one key per line
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode != 0o600
    assert mode == 0o666 & ~umask


def test_a_json_file_nested_without_end_is_one_error(tmp_path):
    """json.loads raises RecursionError, no ValueError, on arrays nested thousands deep: an earlier stage's
    metrics.json so made (`transferkit evaluate --params ... --in prune=DIR`) ended in that traceback."""
    from transferkit.io import load_json

    (tmp_path / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TransferkitError, match=r"cannot read .*metrics.json \(maximum recursion depth exceeded.*\)\. "
                                               r"Fix: run the 'prune' stage again"):
        load_json(tmp_path / "metrics.json", "prune")


def test_save_and_load_torch(tmp_path):
    save_torch({"x": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(load_torch(tmp_path / "t.pt", "thing", "prepare")["x"], torch.arange(3))
    with pytest.raises(TransferkitError, match="run the 'prepare' stage"):
        load_torch(tmp_path / "missing.pt", "thing", "prepare")


@pytest.mark.parametrize("target", ["cifar10-jpeg.tar.gz", "data/cifar10-jpeg.tar.gz", "ABSOLUTE"])
def test_one_archive_under_two_names_shares_no_class_between_the_tasks(tmp_path, monkeypatch, target):
    """`cifar10` resolves to data/cifar10-jpeg.tar.gz offline: a target named by that file's path is the
    same dataset, so a class in both tasks would leak its test images into pretraining."""
    from conftest import compose, run

    write_image_folder(tmp_path / "data", CIFAR10_CLASSES, 2, 1)
    monkeypatch.chdir(tmp_path)
    target = str(tmp_path / "data" / "cifar10-jpeg.tar.gz") if target == "ABSOLUTE" else target
    cfg = compose("experiment=smoke", "data.source.dataset=cifar10", "data.source.classes=[airplane,ship]",
                  f"data.target.dataset={target}", "data.target.classes=[ship,cat]", "data.source.val_per_class=0",
                  "data.target.val_per_class=0", "data.target.train_per_class=2", "data.source.train_per_class=2",
                  tmp=tmp_path)
    with pytest.raises(TransferkitError, match=r"classes \['ship'\] are in both data.source.classes"):
        run("prepare", cfg)


@pytest.mark.parametrize("rank", [0, 1])
def test_the_modules_draws_are_another_stream_than_the_batches(rank):
    """Dropout and mixup draw from the global generator the module seeds at each epoch; the batches' flips
    and shifts from the loader's. One seed for both drew the same numbers: a dropout mask equal to the flips."""
    from transferkit.data.loader import module_seed, rank_seed

    for seed, epoch in ((0, 0), (0, 3), (7, 1)):
        batches = torch.Generator().manual_seed(rank_seed(seed, epoch, rank))
        module = torch.Generator().manual_seed(module_seed(seed, epoch, rank))
        assert not torch.equal(torch.rand(64, generator=batches), torch.rand(64, generator=module))
    assert module_seed(0, 0, rank) != module_seed(0, 1, rank) != module_seed(1, 0, rank)  # per seed and epoch
    # nor any other rank's batches (rank 0's module seed was rank 1's batch seed), in any epoch
    batch_seeds = {rank_seed(s, e, r) for s in range(3) for e in range(5) for r in range(8)}
    assert not batch_seeds & {module_seed(s, e, rank) for s in range(3) for e in range(5)}


def test_every_seed_the_config_allows_seeds_every_rank():
    """seed < 2**32 (numpy's limit): a rank's seed, seed x 10**12 and more, must still fit torch's 64 bits
    (it overflowed from seed 18.5 million: every rank but 0 died on its first batch); small seeds keep theirs."""
    from transferkit.data.loader import rank_seed

    for seed in (0, 18_500_000, 2**32 - 1):
        for rank in (0, 1, 7):
            torch.Generator().manual_seed(rank_seed(seed, 10_000, rank))
    assert rank_seed(3, 2, 1) == (3 * 1_000_003 + 2) * 1_000_003 + 1
    assert rank_seed(10_000_000, 0, 1) == 10_000_000 * 1_000_003 ** 2 + 1  # above 2**63, below 2**64: as it was


def test_a_linked_archive_is_named_by_its_link(tmp_path):
    """data/cifar10-jpeg.tar.gz as a link (DVC's cache names the file it points at by its md5): the
    dataset keeps the name the project gives it, in summary.json and the report."""
    write_image_folder(tmp_path / "store", CIFAR10_CLASSES, 2, 1)
    (tmp_path / "store" / "cifar10-jpeg.tar.gz").rename(tmp_path / "store" / "3fa9c1e0")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar10-jpeg.tar.gz").symlink_to(tmp_path / "store" / "3fa9c1e0")
    assert _load("cifar10", tmp_path / "data").name == "cifar10-jpeg.tar.gz"


def _png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_images(1, 0, size)[0]).save(buf, "PNG")
    return buf.getvalue()


def test_a_tiff_with_a_tag_of_the_wrong_type_is_one_error():
    """PIL raises a TypeError for a StripOffsets tag stored as a float: a damaged file, in one line."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 20)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    for entry in range(10, 10 + 12 * int.from_bytes(data[8:10], "little"), 12):
        if int.from_bytes(data[entry:entry + 2], "little") == 273:  # StripOffsets: type FLOAT (11)
            data[entry + 2:entry + 4] = (11).to_bytes(2, "little")
    with pytest.raises(TransferkitError, match=r"corrupt image a.tif \(.*\). Fix: leave that file out, or replace it."):
        sources.decode_image(bytes(data), "a.tif", 32)


def test_a_zip_of_a_version_zipfile_lacks_is_one_error(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("train", "test"):
            z.writestr(f"{split}/a/0.png", _png())
    data = bytearray(buf.getvalue())
    data[data.find(b"PK\x01\x02") + 6] = 64  # the first member needs zip version 6.4 to extract
    (tmp_path / "v.zip").write_bytes(data)
    with pytest.raises(TransferkitError, match=r"v.zip holds a member Python's zipfile cannot read \(zip file version "
                                               r"6.4\).*Fix: re-create it"):
        read_image_folder(tmp_path / "v.zip")


def test_an_unreadable_image_in_a_folder_is_one_error(tmp_path, monkeypatch):
    """A folder copied from another user may hold files this one cannot open (root reads anything, so the
    refusal is simulated)."""
    folder = write_image_folder(tmp_path, ["a", "b"], 2, 1, archive=False)
    locked = sorted(folder.rglob("*.jpg"))[1]
    opened = Path.open

    def refused(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
    with pytest.raises(TransferkitError, match=f"cannot read {locked} \\(Permission denied\\). Fix: make it readable"):
        read_image_folder(folder)


def test_a_folder_of_large_images_is_read_a_few_megabytes_at_a_time(tmp_path, monkeypatch):
    """Parts of 2,000 files were read whole before decoding, up to 16 at once: a folder of 5 MB photos held about
    160 GB. A part now ends at PART_BYTES too (4 KB here: two of these JPEGs); the images keep their order."""
    folder = write_image_folder(tmp_path, ["a", "b"], 6, 1, archive=False)
    expected = read_image_folder(folder)
    sizes, decode = [], sources._decode_part

    def recorded(part, image_size, limit):
        sizes.append([len(d) if not isinstance(d, Path) else d.stat().st_size for _, d in part])
        return decode(part, image_size, limit)

    monkeypatch.setattr(sources, "_decode_part", recorded)
    monkeypatch.setattr(sources, "PART_BYTES", 4000)
    raw = read_image_folder(folder)
    assert torch.equal(raw.train.images, expected.train.images) and torch.equal(raw.test.images, expected.test.images)
    assert all(sum(part) <= 4000 or len(part) == 1 for part in sizes)
    assert len(sizes) > 3 and max(len(part) for part in sizes) > 1, sizes  # several files to a part, several parts


def test_a_file_larger_than_any_image_in_a_folder_is_refused_before_it_is_read(tmp_path):
    """A folder's files are read as they are decoded, never all at once; one larger than a quarter of memory (a disk
    image, a video renamed) is refused by its size, not read into a MemoryError."""
    folder = write_image_folder(tmp_path, ["a", "b"], 2, 1, archive=False)
    with open(folder / "train" / "a" / "huge.png", "wb") as f:
        f.truncate(archives.memory_limit() + 1)  # sparse: no disk used
    with pytest.raises(TransferkitError, match=r"train/a/huge.png is [0-9.]+ GB, more than the [0-9.]+ GB one file "
                                               r"may take here: no image to read. Fix: remove it"):
        read_image_folder(folder)


def test_an_xmp_orientation_is_applied_by_prepare_as_by_predict():
    """PIL turns a JPEG by the orientation its XMP block gives, with no EXIF block: prepare's batched
    decoder must leave such a file to PIL, or prepare and predict see different pixels."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :8] = 255  # a white bar on the left
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, xmp=xmp)
    prepared = sources.decode_images([("a.jpg", bytearray(buf.getvalue()))], 32, "decoding")[0]
    predicted = torch.from_numpy(sources.decode_image(buf.getvalue(), "a.jpg", 32))
    assert predicted[:, :8].float().mean() > 200  # turned: the bar is on top
    assert torch.equal(prepared, predicted)


def test_an_unreadable_class_folder_is_one_error(tmp_path, monkeypatch):
    """A class folder this user cannot list would be a class with no images, and the error about that names
    the wrong fix (root lists anything, so the refusal is simulated)."""
    folder = write_image_folder(tmp_path, ["cat", "dog"], 2, 1, archive=False)
    refuse_listing(monkeypatch, folder / "train" / "dog")
    with pytest.raises(TransferkitError, match=r"cannot read .*train/dog \(Permission denied\). Fix: make it readable"):
        read_image_folder(folder)


def test_a_split_named_like_a_top_folder_is_no_nested_class(tmp_path):
    """An archive whose top folder is itself called test/, holding train/, test/ and val/: val/'s images
    (test/val/cat/*) are no images nested in a class "val" that the task asks for."""
    top = tmp_path / "d" / "test"
    for split in ("train", "test", "val"):
        for cls in ("cat", "dog"):
            (top / split / cls).mkdir(parents=True)
            (top / split / cls / "0.png").write_bytes(_png())
    path = Path(shutil.make_archive(str(tmp_path / "d"), "gztar", tmp_path / "d"))
    with pytest.raises(TransferkitError, match=r"test/val/cat/0.png lies in val/, which prepare does not read"):
        read_image_folder(path, wanted={"cat", "dog"})  # val/ itself, not a class "val" it would be nested in
    shutil.rmtree(top / "val")
    path = Path(shutil.make_archive(str(tmp_path / "d"), "gztar", tmp_path / "d"))
    raw = read_image_folder(path, wanted={"cat", "dog"})
    assert raw.classes == ["cat", "dog"] and len(raw.train.labels) == 2 and len(raw.test.labels) == 2


@pytest.mark.parametrize("split, fix", [("val", "into train/ or out of the dataset"), ("validation", "into train/ or "
                                        "out of the dataset"), ("Test", "into test/"), ("TRAIN", "into train/")])
def test_a_split_folder_prepare_does_not_read_is_one_error(tmp_path, split, fix):
    """val/ (or Test/) beside train/ and test/: its images were left out without a word (and a target's Test/
    then read as no test images at all)."""
    folder = write_image_folder(tmp_path / "d", ["cat", "dog"], 1, 1, archive=False)
    (folder / split / "cat").mkdir(parents=True)
    (folder / split / "cat" / "0.png").write_bytes(_png())
    for path in (folder, Path(shutil.make_archive(str(tmp_path / "d"), "zip", folder))):
        with pytest.raises(TransferkitError, match=rf"{split}/cat/0.png lies in {split}/, which prepare does not read: "
                                                   rf"it reads train/ and test/, and draws validation images from "
                                                   rf"train/ \(val_per_class\). Fix: move {split}/'s images {fix}\.$"):
            read_image_folder(path)
        assert read_image_folder(path, wanted={"dog"}).classes == ["cat", "dog"]  # not a class the task reads


@pytest.mark.parametrize("as_archive", [False, True])
def test_images_in_a_folder_inside_a_class_are_one_error(tmp_path, as_archive):
    """train/cat/batch2/1.png would be silently left out of the dataset: refused, naming the file."""
    folder = write_image_folder(tmp_path / "d", ["cat", "dog"], 1, 1, archive=False)
    (folder / "train" / "cat" / "batch2").mkdir()
    (folder / "train" / "cat" / "batch2" / "1.png").write_bytes(_png())
    path = shutil.make_archive(str(tmp_path / "d"), "gztar", folder) if as_archive else folder
    with pytest.raises(TransferkitError, match=r"train/cat/batch2/1.png lies in a folder inside its class's folder.*"
                                               r"Fix: move it up"):
        read_image_folder(Path(path))
    with pytest.raises(TransferkitError, match=r"train/cat/batch2/1.png lies in a folder inside its class's folder"):
        read_image_folder(Path(path), wanted={"cat"})  # as prepare reads it: the task's classes only
    assert read_image_folder(Path(path), wanted={"dog"}).classes == ["cat", "dog"]  # not a class the task reads


@pytest.mark.parametrize("as_archive", [False, True])
def test_two_datasets_in_one_folder_are_one_error(tmp_path, as_archive):
    """flowers/ and flowers_backup/ in one archive (or the folder above a dataset given): read as one dataset, an
    image's copy could land in train and its twin in val, without a word."""
    for root in ("flowers", "flowers_backup"):
        write_image_folder(tmp_path / "d" / root, ["rose", "tulip"], 2, 1, archive=False)
    path = Path(shutil.make_archive(str(tmp_path / "d"), "zip", tmp_path / "d")) if as_archive else tmp_path / "d"
    with pytest.raises(TransferkitError, match=r"holds train/ and test/ in flowers/cifar10-jpeg/ and in "
                                               r"flowers_backup/cifar10-jpeg/: two datasets, or two copies of one\. "
                                               r"Fix: give the folder or archive of one dataset alone\.$"):
        read_image_folder(path)
    assert read_image_folder(tmp_path / "d" / "flowers").classes == ["rose", "tulip"]  # one of them: read


def test_a_link_to_nothing_in_a_folder_dataset_is_one_error_as_in_an_archive(tmp_path):
    """A broken link was skipped in a folder (its image left out without a word) and refused in an archive."""
    folder = write_image_folder(tmp_path / "d", ["cat", "dog"], 2, 1, archive=False)
    (folder / "train" / "cat" / "9.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(TransferkitError, match=rf"train/cat/9.png links to {tmp_path / 'nowhere.png'}, which is no "
                                               rf"file\. Fix: remove the link"):
        read_image_folder(folder)


def test_a_task_whose_tensors_claim_more_than_their_storage_is_refused():
    """A view with stride 0 in a file of a few KB can claim 200 million images: every step that reads them
    would run for hours. A prepared task's tensors hold what they claim."""
    from transferkit.data.tasks import task_fault

    splits = ("train", "val", "test")
    task = {"classes": ["a", "b"], **{f"{s}_x": torch.zeros(4, 3, 8, 8, dtype=torch.uint8) for s in splits},
            **{f"{s}_y": torch.zeros(4, dtype=torch.long) for s in splits}}
    assert task_fault(task) is None
    task["test_x"] = torch.zeros(1, 3, 8, 8, dtype=torch.uint8).expand(200_000_000, 3, 8, 8)
    task["test_y"] = torch.zeros(1, dtype=torch.long).expand(200_000_000)
    assert task_fault(task) == "its test_x or test_y claims 200000000 images, more than the file holds (a view " \
                               "repeating it)"
    assert task_fault(task, splits=("train", "val")) is None  # the splits asked about only (export's: test)


def test_a_task_whose_splits_hold_images_of_other_sizes_is_refused():
    """Every split of a prepared task holds images of one size: a model fitted on 8x8 train images is never scored
    on 16x16 test images."""
    from transferkit.data.tasks import task_fault

    splits = ("train", "val", "test")
    task = {"classes": ["a", "b"], **{f"{s}_x": torch.zeros(4, 3, 8, 8, dtype=torch.uint8) for s in splits},
            **{f"{s}_y": torch.zeros(4, dtype=torch.long) for s in splits}}
    task["test_x"] = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    assert task_fault(task) == "its test_x is torch.uint8 of shape (4, 3, 16, 16), not uint8 images [N, 3, S, S] " \
                               "as train_x"
    assert task_fault(task, splits=("test",)) is None  # alone, its size is the one it is checked against


# ============================================================== archives and names as other tools write them
def _zip_link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    """A symbolic link as `zip -y` stores it: a Unix member whose mode says link and whose bytes are its target."""
    info = zipfile.ZipInfo(name)
    info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_linked_class_folder_in_an_archive_counts_as_in_its_folder(jpeg_pair, tmp_path, kind):
    """train/cat/ a link to a folder elsewhere: the folder's reader follows it, and so does the archive's reader
    (`tar` and `zip -y` store the link, not the files)."""
    import subprocess

    folder, _ = jpeg_pair
    copy = tmp_path / "linked"
    shutil.copytree(folder, copy)
    (copy / "pool").mkdir()
    shutil.move(copy / "train" / "cat", copy / "pool" / "cat")
    (copy / "train" / "cat").symlink_to("../pool/cat")
    archive = tmp_path / f"linked.{kind}"
    if kind == "tar":
        subprocess.run(["tar", "cf", str(archive), "-C", str(tmp_path), "linked"], check=True)
    else:
        with zipfile.ZipFile(archive, "w") as out:
            for f in sorted(p for p in copy.rglob("*") if p.is_file() and not p.is_symlink()):
                out.writestr(f"linked/{f.relative_to(copy)}", f.read_bytes())
            out.writestr(*_zip_link("linked/train/cat", "../pool/cat"))
    a, b = read_image_folder(copy), read_image_folder(archive)
    assert "cat" in a.classes and a.classes == b.classes
    assert b.train.labels.tolist() == a.train.labels.tolist() and torch.equal(a.train.images, b.train.images)


def test_a_symlinked_image_in_a_zip_is_the_file_it_names(jpeg_pair, tmp_path):
    """`zip -y` stores a link to a file as a member holding the target's name, which is no image."""
    folder, _ = jpeg_pair
    archive = tmp_path / "linked.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            out.writestr(f"top/{f.relative_to(folder)}", f.read_bytes())
        out.writestr(*_zip_link("top/train/cat/0099.jpg", "../bird/0000.jpg"))
        out.writestr(*_zip_link("top/train/cat/0098.jpg", "/etc/passwd"))
    with pytest.raises(TransferkitError, match=r"0098.jpg in .*linked.zip links to /etc/passwd, which is no file"):
        read_image_folder(archive)
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(tmp_path / "fixed.zip", "w") as out:
        for m in old.infolist():
            if not m.filename.endswith("0098.jpg"):
                out.writestr(m, old.read(m))
    raw = read_image_folder(tmp_path / "fixed.zip")
    cat, bird = raw.classes.index("cat"), raw.classes.index("bird")
    assert int((raw.train.labels == cat).sum()) == int((read_image_folder(folder).train.labels == cat).sum()) + 1
    assert torch.equal(raw.train.images[raw.train.labels == cat][-1], raw.train.images[raw.train.labels == bird][0])


def test_one_file_under_two_spellings_of_its_name_is_read_once(tmp_path):
    """`./train/cat/0.png` (what `tar -C dir .` writes) and `train/cat/0.png` (a later `tar -r`) are one file on
    extraction: read once, as its last version, or it would be both a train and a val image."""
    png = {c: _png() for c in ("a", "b")}
    members = {"./train/cat/0.png": png["a"], "./train/dog/0.png": png["a"], "train/cat/0.png": png["b"],
               "test//cat/0.png": png["a"], "/test/dog/0.png": png["a"]}
    for fmt in ("tar", "zip"):
        path = _archive_with(tmp_path / fmt, fmt, members)
        read = dict(archives.archive_files(path))
        assert sorted(read) == ["test/cat/0.png", "test/dog/0.png", "train/cat/0.png", "train/dog/0.png"]
        assert bytes(read["train/cat/0.png"]) == png["b"]
        assert len(read_image_folder(path).train.labels) == 2


class _InfoZipName(zipfile.ZipInfo):
    """A member whose name is stored in the given encoding without zip's UTF-8 flag, as Info-ZIP's zip does."""
    encoding = "utf-8"

    def _encodeFilenameFlags(self):
        return self.filename.encode(self.encoding), self.flag_bits


def test_zip_names_in_utf8_without_the_flag_keep_their_letters(tmp_path):
    """Info-ZIP's zip writes names in UTF-8 without the flag that says so (and adds them in a field of its own,
    0x7075, beside a name in the local code page): read as cp437 alone, `café` would become `caf├⌐`."""
    path = tmp_path / "names.zip"
    with zipfile.ZipFile(path, "w") as out:
        for split in ("train", "test"):
            out.writestr(_InfoZipName(f"top/{split}/café/0.png"), _png())
            legacy = _InfoZipName(f"top/{split}/naïve/0.png")
            legacy.encoding = "latin-1"  # not UTF-8: read from the 0x7075 field
            stored = legacy.filename.encode("latin-1")
            field = b"\x01" + struct.pack("<I", zlib.crc32(stored)) + legacy.filename.encode()
            legacy.extra = struct.pack("<HH", 0x7075, len(field)) + field
            out.writestr(legacy, _png())
    with zipfile.ZipFile(path) as check:
        assert not any(m.flag_bits & 0x800 for m in check.infolist())  # what this test is about
    assert read_image_folder(path).classes == ["café", "naïve"]


def test_a_stale_utf8_name_field_in_a_zip_is_not_read(tmp_path):
    """Info-ZIP's 0x7075 field holds the name it stood for when written, with that name's CRC-32: after a rename
    the CRC no longer matches the stored name, and the stored name is the member's."""
    path = tmp_path / "renamed.zip"
    with zipfile.ZipFile(path, "w") as out:
        member = zipfile.ZipInfo("top/train/dog/0.png")
        field = b"\x01" + struct.pack("<I", zlib.crc32(b"top/train/cat/0.png")) + b"top/train/cat/0.png"
        member.extra = struct.pack("<HH", 0x7075, len(field)) + field
        out.writestr(member, _png())
    assert [name for name, _ in archives.archive_files(path)] == ["top/train/dog/0.png"]


def test_member_names_with_backslashes_are_read_as_folders(tmp_path):
    """Some Windows archivers store `train\\cat\\0.png`; extracting places it in train/cat/, and so does reading
    the archive as a dataset."""
    path = tmp_path / "windows.zip"
    with zipfile.ZipFile(path, "w") as out:
        for split in ("train", "test"):
            for c in ("cat", "dog"):
                out.writestr(f"top\\{split}\\{c}\\0.png", _png())
    assert sorted(name for name, _ in archives.archive_files(path)) == [f"top/{split}/{c}/0.png" for split in
                                                                        ("test", "train") for c in ("cat", "dog")]
    raw = read_image_folder(path)
    assert raw.classes == ["cat", "dog"] and len(raw.train.labels) == len(raw.test.labels) == 2


def test_class_names_match_whatever_unicode_form_they_are_written_in(tmp_path):
    """macOS writes folder names decomposed (e + a combining accent), a config typed elsewhere composed: one class."""
    import unicodedata

    nfd, nfc = unicodedata.normalize("NFD", "café"), "café"
    assert nfd != nfc
    folder = write_image_folder(tmp_path, [nfd, "dog"], 6, 2, archive=False)
    raw = read_image_folder(folder, wanted={nfc, "dog"})
    assert raw.classes == [nfc, "dog"] and len(raw.train.labels) == 12
    for classes in ([nfc, "dog"], [nfd, "dog"]):
        task = select_task(raw, classes, train_per_class=4, val_per_class=2, test_per_class=None, seed=0,
                           role="target")
        assert task["classes"] == [nfc, "dog"] and len(task["train_y"]) == 8
    with pytest.raises(TransferkitError, match="more than once"):
        select_task(raw, [nfc, nfd], train_per_class=4, val_per_class=2, test_per_class=None, seed=0, role="target")


def test_a_class_with_test_images_only_names_its_missing_train_folder(tmp_path):
    """test/dog/ but train/Dog/: no count is low enough, so the fix is the folder, not train_per_class."""
    folder = write_image_folder(tmp_path, ["cat", "dog"], 6, 2, archive=False)
    (folder / "train" / "dog").rename(folder / "train" / "Dog")
    with pytest.raises(TransferkitError) as e:
        select_task(read_image_folder(folder), ["cat", "dog"], train_per_class=4, val_per_class=2,
                    test_per_class=None, seed=0, role="target")
    msg = str(e.value)
    assert "'dog' has no train images" in msg and "['Dog']" in msg and "train/dog/" in msg
    assert "train_per_class" not in msg
    with pytest.raises(TransferkitError, match=r"'dog' has no train images.*\['Dog'\]"):  # as prepare reads: Dog unread
        select_task(read_image_folder(folder, wanted={"cat", "dog"}), ["cat", "dog"], train_per_class=4,
                    val_per_class=2, test_per_class=None, seed=0, role="target")


def test_every_picture_format_pil_reads_is_an_image_and_data_files_are_not(tmp_path):
    """A .jfif or .pgm in a class folder is a picture PIL reads: left out, the class would silently shrink."""
    folder = write_image_folder(tmp_path, ["cat", "dog"], 2, 1, archive=False)
    img = Image.fromarray(random_images(1, seed=5)[0])
    img.save(folder / "train" / "cat" / "extra.jfif", format="JPEG")
    img.convert("L").save(folder / "train" / "cat" / "extra.pgm", format="PPM")
    for name in ("labels.txt", "features.h5", "notes.csv", "scan.pcd", "frame.rgb", "disparity.pfm"):
        (folder / "train" / "cat" / name).write_text("not a picture")
    raw = read_image_folder(folder)
    assert torch.bincount(raw.train.labels).tolist() == [4, 2]
    assert {".jfif", ".jpe", ".pgm", ".pbm", ".pnm", ".mpo", ".avif", ".apng"} <= sources.image_suffixes()
    assert not {".h5", ".txt", ".pdf", ".eps", ".pcd", ".rgb", ".pfm"} & sources.image_suffixes()


@pytest.mark.parametrize("magic, kind", [(b"\x28\xb5\x2f\xfd", "Zstandard"), (b"7z\xbc\xaf\x27\x1c", "7-Zip"),
                                         (b"Rar!\x1a\x07\x01\x00", "RAR")])
def test_an_archive_in_a_compression_not_read_says_so(tmp_path, magic, kind):
    """A .tar.zst, .7z or .rar is not corrupt, and copying it again would not help."""
    path = tmp_path / "cifar10-jpeg.tar.zst"
    path.write_bytes(magic + bytes(range(256)) * 4)
    with pytest.raises(TransferkitError, match=f"compressed as {kind}.*Fix: extract it") as e:
        read_image_folder(path)
    assert "corrupt" not in str(e.value)


def test_a_drawn_test_subset_spans_the_class_not_its_first_files():
    """test_per_class below what a class has draws its images by a seeded shuffle (kept in file order): the first
    files of a folder may be one photo session. null keeps every test image."""
    raw = _tagged_raw()
    drawn = [_ids(_select(raw, seed=s, test_per_class=3)["test_x"]) for s in range(6)]
    assert drawn[0] == _ids(_select(raw, seed=0, test_per_class=3)["test_x"]) and drawn[0] != drawn[1]
    assert all(ids[:3] == sorted(ids[:3]) and ids[3:] == sorted(ids[3:]) for ids in drawn)
    dog = [i for i in range(N_TEST * len(RAW_CLASSES)) if RAW_CLASSES[i % len(RAW_CLASSES)] == "dog"]
    assert {i for ids in drawn for i in ids[:3]} - set(dog[:3])  # beyond the first three files
    everything = _ids(_select(raw, test_per_class=None)["test_x"])
    assert everything[:N_TEST] == dog


def test_synthetic_tasks_made_with_one_seed_share_no_noise():
    """The source and target synthetic tasks are made with one seed: each class draws from its own stream, or
    the target's images would repeat the source's noise and phases, a correlation no real dataset has."""
    def residual(classes):
        x = make_synthetic(classes, 48, 4, seed=0).train.images[:48].float()
        return (x - x.mean(0)).flatten()

    a, b = residual(["src_a", "src_b"]), residual(["tgt_a", "tgt_b"])
    assert float(a @ b / (a.norm() * b.norm())) < 0.1


def _tar_of(path: Path, files: dict[str, bytes], links: dict[str, str]) -> Path:
    with tarfile.open(path, "w") as out:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            out.addfile(info)
    return path


def test_links_in_an_archive_that_lead_nowhere_matter_only_where_an_image_is_read(tmp_path):
    """A link to a note outside the archive beside the images, or an archive whose first name starts like another
    compression's magic, reads as before; a link inside a linked folder is followed too."""
    files = {f"LZIP-export/{split}/{c}/0.png": _png() for split in ("train", "test") for c in ("cat", "dog")}
    files["LZIP-export/pool/cat/1.png"] = _png()
    links = {"LZIP-export/train/cat/notes.txt": "/home/me/notes.txt", "LZIP-export/train/bird": "../pool/bird",
             "LZIP-export/train/fox": "../pool/cat", "LZIP-export/pool/cat/2.png": "../../train/dog/0.png"}
    raw = read_image_folder(_tar_of(tmp_path / "notes.tar", files, links), wanted={"cat", "dog", "fox"})
    assert raw.classes == ["cat", "dog", "fox"] and torch.bincount(raw.train.labels).tolist() == [1, 1, 2]
    with pytest.raises(TransferkitError, match=r"train/bird in .* links to \.\./pool/bird, which is no file"):
        read_image_folder(tmp_path / "notes.tar", wanted={"cat", "dog", "bird"})


def test_links_too_many_or_too_deep_to_follow_are_one_error_not_a_stall(tmp_path):
    """Resolving a link looks up its folders at every depth links sit at: hundreds of links at as many depths
    would cost their number squared, so past a budget no ordinary archive reaches, the archive is refused."""
    links = {"/".join(["d"] * depth) + "/l": "x" for depth in range(1, 500)}
    with pytest.raises(TransferkitError, match="links too many or too deep to follow. Fix: extract it"):
        read_image_folder(_tar_of(tmp_path / "deep.tar", {"top/train/cat/0.png": _png()}, links))


def test_a_zip_link_past_the_longest_path_is_no_file_not_a_memory_error(jpeg_pair, tmp_path):
    folder, _ = jpeg_pair
    with zipfile.ZipFile(tmp_path / "long.zip", "w") as out:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            out.writestr(f"top/{f.relative_to(folder)}", f.read_bytes())
        out.writestr(*_zip_link("top/train/cat/0099.jpg", "a/" * 3000))
        out.writestr(*_zip_link("top/notes.txt", "a/" * 3000))
    with pytest.raises(TransferkitError, match=r"0099.jpg in .*long.zip links to (a/)+\.\.\., which is no file"):
        read_image_folder(tmp_path / "long.zip")


def test_the_memory_cap_is_a_quarter_of_a_shells_ulimit_v_below_the_machines():
    """`ulimit -v` below the machine's memory: the archive cap and ONNX Runtime's bound were reckoned from the
    machine's memory and container alone, and named more than the process could map."""
    import subprocess
    import sys

    import psutil

    from transferkit.data.memory import address_space_limit, cgroup_limit

    total = psutil.virtual_memory().total
    limit = min(total, cgroup_limit() or total, address_space_limit() or total) // 2  # below every other bound
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, "
            f"({limit}, resource.getrlimit(resource.RLIMIT_AS)[1])); "
            "from transferkit.data.memory import memory_limit; print(memory_limit())")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ran.stdout.strip() == str(limit // 4), ran.stderr
