"""The DVC pipeline as users run it: `dvc repro` on the smoke experiment in a fresh copy of
the project, then a second `dvc repro` that does nothing, a clean `dvc status`, and
`dvc metrics show` / `dvc plots show` reading what the stages declared."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose
from transferkit.config.compose import params_text


def _sh(cmd: list[str], cwd: Path, timeout=600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # transferkit, dvc
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_twice_is_a_no_op_and_status_is_clean(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    for item in ("conf", "src", "dvc.yaml", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, proj / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, proj / item)
    (proj / "params.yaml").write_text(params_text(compose("experiment=smoke")))
    (proj / "data").mkdir()
    (proj / "data" / "README").write_text("smoke runs on synthetic data\n")
    _sh(["git", "init", "-q"], proj)
    _sh(["dvc", "init", "-q"], proj)
    _sh(["dvc", "add", "-q", "data"], proj)
    # dvclive needs a commit to exist (it reads HEAD); every real clone has one
    _sh(["git", "add", "-A"], proj)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], proj)

    first = _sh(["dvc", "repro"], proj)
    from transferkit.stages import STAGES

    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    second = _sh(["dvc", "repro"], proj)
    assert "Running stage" not in second
    assert "up to date" in _sh(["dvc", "status"], proj)

    metrics = _sh(["dvc", "metrics", "show"], proj)
    assert "artifacts/evaluate/metrics.json" in metrics and "models.transfer.top1" in metrics
    _sh(["dvc", "plots", "show", "--out", str(tmp_path / "plots")], proj)
    assert (tmp_path / "plots" / "index.html").exists()

    # a changed parameter reruns only the stages that depend on it
    text = (proj / "params.yaml").read_text().replace("tta_flip: true", "tta_flip: false")
    (proj / "params.yaml").write_text(text)
    third = _sh(["dvc", "repro"], proj)
    assert "Running stage 'evaluate'" in third and "Running stage 'pretrain'" not in third
