"""Files are data, never code: every reader of a file the project writes or takes from a user
is fed a poisoned file (a pickle whose __reduce__ creates a marker file when unpickled). Each
must end in one clear error naming the file, and the marker must not exist afterwards."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CIFAR10_CLASSES, compose, one_error_line, run, write_cifar_pickles
from transferkit import cli
from transferkit.errors import TransferkitError


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the loader ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def poison_torch_file(path: Path, marker: Path) -> None:
    """A torch.save file that looks like the real one but carries the payload inside."""
    real = torch.load(path, weights_only=True) if path.exists() else {}
    torch.save({**real, "extra": [1, {"nested": Payload(marker)}]}, path)


def _cli_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def project(smoke_artifacts, tmp_path):
    """A finished smoke pipeline copied into tmp_path (artifacts/ and the config for it)."""
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    return tmp_path, compose("experiment=smoke", tmp=tmp_path), tmp_path / "marker"


def test_predict_refuses_a_poisoned_model_file(project, capsys):
    root, _, marker = project
    evil = root / "model.pt"
    torch.save({"arch": {"name": "fastnet"}, "classes": ["a", "b"], "state_dict": Payload(marker)}, evil)
    image = root / "cat.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    line = _cli_error(capsys, ["predict", str(evil), str(image)])
    assert "not plain data" in line and str(evil) in line and "io.open" in line
    assert not marker.exists()


def test_the_refusal_names_what_the_file_would_have_run(tmp_path):
    """torch words a global of a module it allows differently from one of a module it blocks (os.system)."""
    import os

    from transferkit.io import load_plain

    class Shell:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "marker"),))

    torch.save({"state_dict": Shell()}, tmp_path / "model.pt")
    with pytest.raises(TransferkitError, match=r"run code from the file \(Trying to load unsupported posix.system "
                                               r"whose module posix is blocked\)"):
        load_plain(tmp_path / "model.pt", "do not use it.")
    assert not (tmp_path / "marker").exists()


def test_export_refuses_a_poisoned_model_file(project, capsys):
    root, _, marker = project
    model = root / "artifacts" / "prune" / "model.pt"
    poison_torch_file(model, marker)
    line = _cli_error(capsys, ["export", str(model), "--out", str(root / "exported")])
    assert "not plain data" in line and str(model) in line
    assert not marker.exists() and not (root / "exported").exists()


@pytest.mark.parametrize("stage,poisoned", [
    ("transfer", "prepare/target.pt"),     # a prepared task
    ("transfer", "pretrain/model.pt"),     # an upstream backbone
    ("distill", "transfer/model.pt"),      # an upstream teacher
    ("evaluate", "prune/model.pt"),        # a model evaluate scores
])
def test_a_stage_refuses_a_poisoned_upstream_file(project, stage, poisoned):
    root, cfg, marker = project
    path = root / "artifacts" / poisoned
    poison_torch_file(path, marker)
    before = {p: p.read_bytes() for p in (root / "artifacts" / stage).rglob("*") if p.is_file()}
    with pytest.raises(TransferkitError, match="not plain data") as e:
        run(stage, cfg)
    assert str(path) in str(e.value) and "Fix:" in str(e.value)
    assert not marker.exists()
    assert {p: p.read_bytes() for p in (root / "artifacts" / stage).rglob("*") if p.is_file()} == before


def test_a_stage_refuses_a_poisoned_resume_checkpoint(project):
    """A killed run's work folder holds a Lightning checkpoint that the next run resumes from."""
    from conftest import resumable_leftover
    from transferkit.training.trainer import CHECKPOINT, LOG_SNAPSHOT

    root, cfg, marker = project
    work = resumable_leftover("scratch", cfg)
    (work / LOG_SNAPSHOT).mkdir(parents=True)
    torch.save({"epoch": 0, "state_dict": {}, "callbacks": Payload(marker)}, work / CHECKPOINT)
    with pytest.raises(TransferkitError, match="not plain data") as e:
        run("scratch", cfg)
    assert str(work / CHECKPOINT) in str(e.value) and "Fix:" in str(e.value)
    assert not marker.exists()


def test_collect_refuses_a_poisoned_score_cache(project, capsys):
    root, _, marker = project
    cache = root / "artifacts" / "collected" / "scores.pt"
    cache.parent.mkdir()
    torch.save({"some|key": Payload(marker)}, cache)
    line = _cli_error(capsys, ["collect", str(root / "artifacts")])
    assert "not plain data" in line and str(cache) in line and "delete" in line
    assert not marker.exists()


def test_check_repro_checkpoint_comparison_refuses_a_poisoned_checkpoint(project, capsys):
    from transferkit.reproducibility.check import Report, compare_outputs

    root, _, marker = project
    for name in ("run1", "run2"):
        shutil.copytree(root / "artifacts", root / name / "artifacts")
    poison_torch_file(root / "run2" / "artifacts" / "distill" / "model.pt", marker)
    report = Report()
    compare_outputs(root / "run1", root / "run2", report)
    out = capsys.readouterr().out
    assert report.failed == 1 and "FAIL  artifacts/distill/model.pt differs" in out
    assert "not plain data" in out
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"\xbd" * 64, b"plain text, no pickle", b"PK\x03\x04" + bytes(60)],
                         ids=["unknown opcode", "text", "cut-off zip"])
def test_a_damaged_file_is_called_unreadable_not_code(tmp_path, content):
    # only a file that names something to run is "not plain data"; damage is damage, with its own fix
    from transferkit.errors import NotPlainData
    from transferkit.io import load_plain, load_torch

    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(TransferkitError, match="unreadable") as e:
        load_torch(path, "the backbone", "pretrain")
    assert not isinstance(e.value, NotPlainData) and "not plain data" not in str(e.value)
    assert str(e.value).startswith(f"the backbone at {path} is unreadable")
    assert "(`dvc repro -s -f pretrain`)" in str(e.value)
    path.unlink()
    poison_torch_file(path, tmp_path / "marker")
    with pytest.raises(NotPlainData, match="not plain data"):
        load_plain(path, "delete it.")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("poisoned,verify", [
    ("batches.meta", False),   # unverified by its md5 unless verify_checksums is on
    ("data_batch_1", False),   # a deliberately modified copy, read with verify_checksums=false
    ("batches.meta", True),    # verified: refused by its checksum before it is read
])
def test_official_cifar_pickles_cannot_run_code(tmp_path, poisoned, verify):
    marker = tmp_path / "marker"
    folder = write_cifar_pickles(tmp_path / "data", "cifar10", CIFAR10_CLASSES, 10, 2)
    original = pickle.loads((folder / poisoned).read_bytes())
    key = b"label_names" if poisoned == "batches.meta" else b"labels"
    with open(folder / poisoned, "wb") as f:
        pickle.dump({**original, key: Payload(marker)}, f)
    cfg = compose("experiment=smoke", "data.source.dataset=cifar10", "data.target.dataset=cifar10",
                  "data.source.classes=[airplane,ship]", "data.target.classes=[cat,dog]",
                  "data.target.train_per_class=2", "data.target.val_per_class=1",
                  f"data.verify_checksums={str(verify).lower()}", tmp=tmp_path)
    with pytest.raises(TransferkitError) as e:
        run("prepare", cfg)
    assert str(folder / poisoned) in str(e.value)
    assert ("checksum" if verify else "not plain data") in str(e.value)
    assert not marker.exists()


def test_the_cifar_reader_still_reads_protocol_2_pickles(tmp_path):
    """The official files are Python 2 pickles (protocol 2, numpy arrays via _codecs.encode)."""
    import numpy as np

    from transferkit.data.cifar import read_cifar_pickles

    folder = write_cifar_pickles(tmp_path, "cifar10", CIFAR10_CLASSES, 5, 1)
    for f in folder.iterdir():
        obj = pickle.loads(f.read_bytes())
        f.write_bytes(pickle.dumps(obj, protocol=2))
    raw = read_cifar_pickles(folder, "cifar10", verify_checksums=False)
    assert raw.classes == CIFAR10_CLASSES and raw.train.images.dtype == torch.uint8
    assert len(raw.train.labels) == 50 and np.asarray(raw.test.images).shape == (10, 3, 32, 32)


def test_cli_stage_with_poisoned_input_prints_one_error_line(project):
    from conftest import cli as run_cli
    from transferkit.config.compose import params_text

    root, cfg, marker = project
    poison_torch_file(root / "artifacts" / "prepare" / "target.pt", marker)
    (root / "params.yaml").write_text(params_text(cfg))
    line = one_error_line(run_cli("scratch", "--params", str(root / "params.yaml"), cwd=root))
    assert "not plain data" in line
    assert not marker.exists()


def test_download_extracts_without_unpickling(tmp_path, monkeypatch):
    """The download step fetches, checks the archive's md5 and extracts; it reads no pickle
    (torchvision's dataset classes would unpickle batches.meta on construction)."""
    import hashlib
    import tarfile

    from torchvision.datasets import CIFAR10

    from transferkit.data.cifar import download_cifar

    marker = tmp_path / "marker"
    folder = write_cifar_pickles(tmp_path / "src", "cifar10", CIFAR10_CLASSES, 5, 1)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": Payload(marker)}, f)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    import torchvision.datasets.utils as tv_utils

    fetched = []

    def fetch(url, root, filename=None, md5=None, **_):  # the network, replaced by a local copy
        fetched.append((url, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, Path(root) / filename)
        assert tv_utils.check_integrity(str(Path(root) / filename), md5)

    monkeypatch.setattr(tv_utils, "download_url", fetch)
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    download_cifar("cifar10", tmp_path / "data")
    assert fetched == [(CIFAR10.url, CIFAR10.tgz_md5)]  # the official address, checked by md5
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").exists()
    assert not marker.exists()


@pytest.mark.parametrize("field, value, problem", [
    ("layer_shapes", None, "layer_shapes"), ("arch", {"widths": [8, 8, 8]}, "'arch'"), ("arch", "fastnet", "'arch'"),
    ("arch", {"name": ["fastnet"], "pruned": True}, "'arch'"), ("classes", "abc", "'classes'"),
    ("state_dict", {"head.fc.weight": 3}, "'state_dict'"), ("layer_shapes", {"head.fc": 5}, "layer_shapes"),
    # plain data, but not a channel count: setting a module's `forward` (or any attribute) is refused
    ("layer_shapes", {"head": {"forward": 1}}, "head.forward is no channel count"),
    # a count of no channels is refused as what it is, before any layer is resized to it
    ("layer_shapes", {"blocks.1.0.0": {"in_channels": 4, "out_channels": 0, "groups": 1}}, "no channel counts")])
def test_a_pruned_model_file_with_a_field_altered_is_one_error(tmp_path, field, value, problem):
    """A model.pt is plain data, so what a stranger can send is a checkpoint with fields of the wrong kind:
    each is one error naming the field, never a traceback or a model with other attributes set."""
    from transferkit.models import build_model, load_checkpoint, save_checkpoint
    from transferkit.prune.structured import prune_channels

    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8).eval()
    prune_channels(model, criterion="l2", target="channels", ratio=0.5, keep=["head"])
    model.arch["pruned"] = True
    save_checkpoint(model, tmp_path / "model.pt", ["a", "b", "c"])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    ckpt[field] = value if not (field == "arch" and isinstance(value, dict) and "name" not in value) else {
        **{k: v for k, v in ckpt["arch"].items() if k != "name"}, **value}
    torch.save(ckpt, tmp_path / "altered.pt")
    with pytest.raises(TransferkitError, match="altered.pt (is not a transferkit checkpoint|does not fit)") as e:
        load_checkpoint(tmp_path / "altered.pt", "prune")
    assert problem in str(e.value) and "Fix:" in str(e.value)


# ------------------------------------------------------------------ sizes a stranger's file forges
def _small_checkpoint(path: Path, pruned: bool = False) -> dict:
    """A small fastnet checkpoint (pruned: cut by half, with its layer_shapes) saved at `path`, read back."""
    from transferkit.models import build_model, save_checkpoint

    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8).eval()
    if pruned:
        from transferkit.prune.structured import prune_channels

        prune_channels(model, criterion="l2", target="channels", ratio=0.5, keep=["head"])
        model.arch["pruned"] = True
    save_checkpoint(model, path, ["a", "b", "c"])
    return torch.load(path, weights_only=True)


def _laughs(levels: int) -> list:
    """A nested list of 10**levels leaves that pickle's memo keeps to a few bytes per level."""
    nested = ["x"]
    for _ in range(levels):
        nested = [nested] * 10
    return nested


@pytest.mark.parametrize("key, value", [
    ("dirac_init", _laughs(6)),    # truthy: accepted, and torch.export would then walk it
    ("junk", _laughs(5)),          # refused by the builder, with the whole arch in its message
    ("activation", "x" * 100_000), ("widths", [8, [16], 16]), ("stem_width", {"a": 8}), ("widths", [8] * 100)])
def test_an_arch_setting_that_is_no_plain_value_is_one_short_error(tmp_path, key, value):
    """Pickle's memo lets a 50 KB file hold a list of a billion lists: an arch value must be a number, a name or
    a short flat list, refused by its key otherwise, and never written out in the message."""
    from transferkit.models import load_checkpoint

    ckpt = _small_checkpoint(tmp_path / "model.pt")
    torch.save({**ckpt, "arch": {**ckpt["arch"], key: value}}, tmp_path / "forged.pt")
    with pytest.raises(TransferkitError) as e:
        load_checkpoint(tmp_path / "forged.pt", "pretrain")
    message = str(e.value)
    assert "not a transferkit checkpoint" in message and repr(key) in message and "Fix:" in message
    assert len(message) < 500 and "\n" not in message


def _rezip(source: Path, target: Path, compress_type: int, repeat: str | None = None) -> None:
    """`source`'s records in a zip written by Python (`repeat`: a record whose central entry appears 50 times,
    all of them pointing at the one copy of its bytes)."""
    import copy
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", compress_type) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        if repeat:
            entry = next(i for i in zout.filelist if i.filename.endswith(repeat))
            zout.filelist.extend(copy.copy(entry) for _ in range(50))


@pytest.mark.parametrize("compress_type, repeat, problem", [
    (8, None, "compressed records"),               # deflate: 40 MB of zeros in 40 KB
    (0, "data/0", "records that add up to"),       # stored, but one record's bytes claimed 50 times
])
def test_a_zip_that_expands_beyond_its_size_is_refused_before_it_is_read(tmp_path, compress_type, repeat, problem):
    from transferkit.io import load_torch

    torch.save({"big": torch.zeros(10_000_000)}, tmp_path / "plain.pt")
    _rezip(tmp_path / "plain.pt", tmp_path / "forged.pt", compress_type, repeat)
    with pytest.raises(TransferkitError) as e:
        load_torch(tmp_path / "forged.pt", "model checkpoint", "pretrain")
    message = str(e.value)
    assert message.startswith(f"model checkpoint at {tmp_path / 'forged.pt'} ") and problem in message
    assert "torch.save never writes" in message and message.endswith("(`dvc repro -s -f pretrain`).")
    # the same records stored once each, as torch.save writes them, read as before
    _rezip(tmp_path / "plain.pt", tmp_path / "stored.pt", 0)
    stored = load_torch(tmp_path / "stored.pt", "model checkpoint", "pretrain")
    assert torch.equal(stored["big"], torch.zeros(10_000_000))


def test_class_names_the_head_does_not_have_are_refused_before_the_head_is_built(tmp_path):
    """One string referenced 300,000 times is 1 MB of file and a head of 300,000 outputs."""
    from transferkit.models import load_checkpoint

    ckpt = _small_checkpoint(tmp_path / "model.pt")
    torch.save({**ckpt, "classes": ["c"] * 300_000}, tmp_path / "repeated.pt")
    with pytest.raises(TransferkitError, match=r"repeated.pt is not a transferkit checkpoint \(its 'classes' are no "
                                               r"list of two or more distinct names"):
        load_checkpoint(tmp_path / "repeated.pt", "pretrain")
    torch.save({**ckpt, "classes": ["a", "b", "c", "d"]}, tmp_path / "four.pt")
    with pytest.raises(TransferkitError, match=r"four.pt does not fit .*\(its head has 3 outputs for 4 classes\)"):
        load_checkpoint(tmp_path / "four.pt", "pretrain")


def test_the_weight_guard_counts_the_head_the_class_names_build():
    from transferkit.models import _weight_bytes, build_model

    arch = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8).arch
    assert _weight_bytes(arch, 1003) - _weight_bytes(arch, 3) == 1000 * 16 * 4  # 16 features, no bias


@pytest.mark.parametrize("forge, problem", [
    # every entry a view of one storage: each loads as a tensor the size of the file
    (lambda sd: dict.fromkeys(sd, torch.zeros(500_000)), "its tensors add up to"),
    # one tensor of another shape than its layer's recorded channel counts
    (lambda sd: {**sd, "blocks.1.0.0.weight": torch.zeros(16, 4, 3, 3)},
     "blocks.1.0.0.weight has shape (16, 4, 3, 3), its layer_shapes say (4, 4, 3, 3)"),
])
def test_a_pruned_model_allocates_only_what_its_layer_shapes_say(tmp_path, forge, problem):
    from transferkit.models import load_checkpoint

    ckpt = _small_checkpoint(tmp_path / "model.pt", pruned=True)
    torch.save({**ckpt, "state_dict": forge(ckpt["state_dict"])}, tmp_path / "forged.pt")
    with pytest.raises(TransferkitError, match=r"forged.pt does not fit its own architecture") as e:
        load_checkpoint(tmp_path / "forged.pt", "prune")
    assert problem in str(e.value)


def test_a_pruned_model_whose_layers_do_not_fit_each_other_is_refused_as_it_loads(tmp_path):
    """Each tensor fits its own layer's recorded sizes, but a conv gives 5 channels to a BatchNorm of 4: the model
    loaded, and export and evaluate then ended in a RuntimeError traceback from the first forward."""
    from transferkit.models import load_checkpoint

    ckpt = _small_checkpoint(tmp_path / "model.pt", pruned=True)
    ckpt["layer_shapes"]["blocks.1.0.0"]["out_channels"] = 5
    ckpt["state_dict"]["blocks.1.0.0.weight"] = torch.zeros(5, 4, 3, 3)
    torch.save(ckpt, tmp_path / "forged.pt")
    with pytest.raises(TransferkitError, match=r"forged.pt does not fit its own architecture .*Fix: ") as e:
        load_checkpoint(tmp_path / "forged.pt", "prune")
    assert "\n" not in str(e.value) and "running_mean" in str(e.value)  # one line, naming what does not fit


_ALIAS_BOMB = "".join(f"l{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else 'x'] * 10)}]\n" for i in range(5))


@pytest.mark.parametrize("text, needle", [(_ALIAS_BOMB, "an alias (*name), which no file transferkit writes holds"),
                                          ("a: " + "[" * 5000 + "]" * 5000, "nested more than 32 levels deep"),
                                          ("a: " + "[" * 200 + "]" * 200, "nested more than 32 levels deep")])
def test_a_params_file_that_expands_or_nests_without_end_is_one_line(tmp_path, capsys, text, needle):
    """Aliases of aliases multiply what reading builds, ten times a level here: a params file of a few kilobytes
    expanded to gigabytes before any key of it was checked. A file nested 5,000 deep was a RecursionError
    traceback from the parser, one 200 deep from OmegaConf."""
    (tmp_path / "params.yaml").write_text(text)
    line = _cli_error(capsys, ["prepare", "--params", str(tmp_path / "params.yaml")])
    assert "params.yaml is not valid YAML" in line and needle in line and "Fix:" in line, line


def test_a_params_file_nested_32_levels_deep_is_read_and_one_33_deep_is_refused():
    """The limit is the one the refusal names: "nested more than 32 levels deep"."""
    import yaml

    from transferkit.plain import plain_yaml

    assert plain_yaml("a: " + "[" * 31 + "]" * 31)  # the top mapping and 31 lists: 32 levels
    with pytest.raises(yaml.YAMLError, match="nested more than 32 levels deep"):
        plain_yaml("a: " + "[" * 32 + "]" * 32)
