"""The DVC pipeline as users run it: `dvc repro` on the smoke experiment in a fresh copy of
the project, then a second `dvc repro` that does nothing, a clean `dvc status`, and
`dvc metrics show` / `dvc plots show` reading what the stages declared."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from transferkit.reproducibility.check import child_env, copy_project


def _sh(cmd: list[str], cwd: Path, timeout=600) -> str:
    # the environment check-repro gives its commands: this venv's transferkit and dvc first on PATH
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_twice_is_a_no_op_and_status_is_clean(tmp_path):
    # a fresh clone: code and conf/, params.yaml for the smoke experiment, data/ tracked, one commit
    proj = copy_project(ROOT, tmp_path / "proj", "smoke")

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
