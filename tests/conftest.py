"""Shared test fixtures: tiny configs composed from the real conf/, and fake datasets written
in the real on-disk formats (official CIFAR pickles, image-folder trees and archives)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Tiny-but-real settings layered on any experiment preset: one short epoch per stage.
TINY = [
    "pretrain.epochs=1", "transfer.epochs=1", "probe.epochs=1", "scratch.epochs=1", "distill.epochs=1",
    "prune.epochs=1", "prune.batch_size=8", "pretrain.batch_size=16", "transfer.batch_size=8", "probe.batch_size=8",
    "scratch.batch_size=8",
    "distill.batch_size=8",
    "evaluate.latency_repeats=2", "evaluate.throughput_batch=8", "evaluate.throughput_repeats=1",
    "evaluate.batch_size=32", "trainer.progress_bar=false", "quantize.calibration_images=8", "quantize.max_drop=1",
    "quantize.qat_epochs=1",
]

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def outside(tmp: Path) -> list[str]:
    """Overrides that keep a run's data and artifacts in `tmp`: a command run in the checkout, from a test that
    expects it refused, writes nothing there if the refusal breaks."""
    return [f"paths.artifacts_dir={tmp / 'artifacts'}", f"paths.data_dir={tmp / 'data'}"]


def dvc_project(root: Path, stages: dict) -> Path:
    """A project's folder as DVC and transferkit find it: conf/config.yaml and a dvc.yaml of `stages`."""
    import yaml

    (root / "conf").mkdir(parents=True)
    (root / "conf" / "config.yaml").write_text("seed: 0\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return root


def compose(*overrides: str, tmp: Path | None = None):
    from transferkit.config.compose import compose as _compose

    from transferkit.config.overrides import override_key

    layered = {override_key(o): o for o in [*overrides, *(outside(tmp) if tmp else [])]}  # a test's own value wins
    return _compose(list(layered.values()), CONF)


def cli(*args, cwd=ROOT, timeout=300, env=None):
    """The `transferkit` command in a fresh process, as a user runs it (`env`: variables to add)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "transferkit.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc) -> str:
    """The contract for bad input: exit code 2, no traceback, exactly one `error:` line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def run(stage: str, cfg) -> dict:
    """Run one stage in-process exactly as the CLI does (validation, seeding, staged output); a
    stage with a command of its own (export) through that command, as dvc.yaml runs it."""
    from transferkit import cli
    from transferkit.stages import BY_NAME
    from transferkit.stages.run import run_stage

    artifacts = Path(cfg.paths.artifacts_dir)
    if command := BY_NAME[stage].command:
        argv = command.format(out=artifacts / stage, **{r: artifacts / r for r in BY_NAME[stage].reads}).split()
        assert cli.main([*argv[1:], "--repeats", str(cfg.evaluate.latency_repeats)]) == 0
        return {}
    return run_stage(stage, cfg, artifacts / stage)


def resumable_leftover(stage: str, cfg) -> Path:
    """The work folder a killed run of `stage` leaves, as the next run with `cfg` resumes it: the
    params and resume key staged_output wrote (a test adds the checkpoint)."""
    import yaml

    from transferkit.config.compose import to_params
    from transferkit.stages import inputs_of, named_files
    from transferkit.stages.common import PARAMS_FILE, RESUME_KEY, resume_key
    from transferkit.stages.run import tracked

    work = Path(cfg.paths.artifacts_dir) / f".{stage}.incomplete"
    work.mkdir(parents=True)
    (work / PARAMS_FILE).write_text(yaml.safe_dump(to_params(cfg), sort_keys=False))
    named = named_files(stage, to_params(cfg)).values()
    reads = [*inputs_of(stage, cfg.paths.artifacts_dir).values(), *map(Path, named)]
    (work / RESUME_KEY).write_text(resume_key(reads, tracked(stage, cfg)))
    return work


def run_all(cfg, stages=None) -> dict:
    from transferkit.stages import STAGES

    return {s: run(s, cfg) for s in stages or STAGES}


@pytest.fixture
def smoke(tmp_path):
    """The smoke experiment with its artifacts in a temporary folder."""
    return compose("experiment=smoke", tmp=tmp_path)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder that `make(folder)` fills once per test session, for tests that only read it: under
    pytest-xdist, once for all workers, as xdist documents it (a lock in their common temporary
    folder), not once per worker that runs such a test."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' own folders sit side by side in the session's
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():  # not yet, or an earlier attempt failed: from the start
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def smoke_artifacts(tmp_path_factory):
    """One full smoke pipeline run, shared by tests that only read its outputs."""
    def make(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(run_all(compose("experiment=smoke", tmp=tmp))))

    tmp = made_once(tmp_path_factory, "smoke", make)
    return compose("experiment=smoke", tmp=tmp), json.loads((tmp / "results.json").read_text())


@pytest.fixture
def one_thread(monkeypatch):
    """The processes this test starts through dvc train at one thread, as every test does (cli()
    likewise): two threads spin-wait for each other while the test beside it holds the other core."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def server_dir(monkeypatch):
    """A private temporary folder for this test's TRANSFERKIT_WARM servers (a short path: a
    socket's path is limited to about 100 bytes), and servers that exit soon after the test."""
    folder = tempfile.mkdtemp(prefix="tkw")
    monkeypatch.setenv("TMPDIR", folder)
    monkeypatch.setattr(tempfile, "tempdir", folder)
    monkeypatch.setenv("TRANSFERKIT_WARM_IDLE", "20")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def running(pid: int) -> bool:  # a zombie no one reaps (PID 1 in a container may not) has ended
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


# ------------------------------------------------------------------ fake datasets on disk
def random_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_cifar_pickles(root: Path, name: str, classes: list[str], train_per_class: int,
                        test_per_class: int) -> Path:
    """The official python layout (cifar-10-batches-py / cifar-100-python), tiny."""
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"

    def batch(per_class: int, seed: int) -> dict:
        labels = np.repeat(np.arange(len(classes)), per_class)
        data = random_images(len(labels), seed).transpose(0, 3, 1, 2).reshape(len(labels), -1)
        return {b"data": data, label_key: labels.tolist()}

    def dump(obj, fname):
        with open(folder / fname, "wb") as f:
            pickle.dump(obj, f)

    if name == "cifar10":
        for i in range(1, 6):  # the 5 official training batches
            per = train_per_class // 5 + (1 if i <= train_per_class % 5 else 0)
            dump(batch(per, i), f"data_batch_{i}")
        dump(batch(test_per_class, 99), "test_batch")
        dump({b"label_names": [c.encode() for c in classes]}, "batches.meta")
    else:
        dump(batch(train_per_class, 1), "train")
        dump(batch(test_per_class, 99), "test")
        dump({b"fine_label_names": [c.encode() for c in classes]}, "meta")
    return folder


def refuse_listing(monkeypatch, folder: Path) -> None:
    """os.scandir refuses `folder` as it does a user without read access to it (root lists anything)."""
    scandir = os.scandir

    def refused(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)


def write_image_folder(root: Path, classes: list[str], train_per_class: int, test_per_class: int,
                       archive: bool | str = True, top: str = "cifar10-jpeg") -> Path:
    """train/<class>/*.jpg + test/<class>/*.jpg, as a .tar.gz (default), a .zip (archive="zip") or a
    folder (archive=False)."""
    files = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for ci, c in enumerate(classes):
            for i, img in enumerate(random_images(n, seed=ci * 1000 + (split == "test"))):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                files[f"{top}/{split}/{c}/{i:04d}.jpg"] = buf.getvalue()
    root.mkdir(parents=True, exist_ok=True)
    if not archive:
        for name, data in files.items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return root / top
    if archive == "zip":
        path = root / f"{top}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in sorted(files.items()):
                zf.writestr(name, data)
        return path
    path = root / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # tests run many tiny models: one thread avoids OpenMP spin-waits on a busy 2-core box.
    # Session scope, so it is set before any session fixture trains: results depend on the
    # thread count, and tests compare runs made at different times.
    import torch

    torch.set_num_threads(int(os.environ.get("TRANSFERKIT_TEST_THREADS", "1")))
