"""DDP with 2 CPU processes (gloo): the multi-device path runs for real, through the CLI
exactly as dvc repro calls it, with no code change: only `trainer=ddp`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import compose, run
from transferkit.config.compose import params_text
from transferkit.models import load_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_transfer_under_ddp_with_two_cpu_processes(tmp_path, server_dir, warm):
    """warm: the command runs in a worker of the TRANSFERKIT_WARM server, and the second rank is
    started as the command would be (`python -m transferkit.cli ...`), not as the server."""
    stage = "transfer"
    cfg = compose("experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.num_threads=1", tmp=tmp_path)
    single = compose("experiment=smoke", tmp=tmp_path)  # inputs made on one process
    params = tmp_path / "params.yaml"
    params.write_text(params_text(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TRANSFERKIT_WARM": str(int(warm)),
           # the in-process pretrain below may outlast the fixture's 20 s idle: the server must wait for it
           "TRANSFERKIT_WARM_IDLE": "120"}
    # a command, as dvc runs it: with warm, this first one starts the server that serves the one under test
    subprocess.run([sys.executable, "-m", "transferkit.cli", "prepare", "--params", str(params)], cwd=tmp_path,
                   env=env, check=True, capture_output=True, timeout=300)
    run("pretrain", single)
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli", stage, "--params", str(params)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 1/2" in proc.stderr + proc.stdout and "MEMBER: 2/2" in proc.stderr + proc.stdout  # two ranks ran
    out = tmp_path / "artifacts" / stage
    model, ckpt = load_checkpoint(out / "model.pt", stage)
    assert ckpt["classes"] == ["tgt_a", "tgt_b", "tgt_c"]
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["val_acc"] <= 1.0
    timing = json.loads((out / "timing.json").read_text())
    # 72 target images, 36 a rank: 2 steps of 16 an epoch on each of the 2 ranks (one process alone: 4 steps)
    assert (timing["train_images_per_second"] * timing["train_seconds"]
            == pytest.approx(cfg.transfer.epochs * 2 * 2 * 16, rel=0.02))
    assert not (tmp_path / "artifacts" / f".{stage}.incomplete").exists()
    assert bool(list(server_dir.glob("*/*.sock"))) == warm


@pytest.mark.parametrize("env, first", [
    ({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True), ({"SLURM_PROCID": "0"}, True),
    # `NODE_RANK=1 transferkit STAGE` on a second node (ddp_multinode's plain launch): before Lightning starts
    # that node's processes, the first has no LOCAL_RANK, and it is not rank 0
    ({"NODE_RANK": "1"}, False), ({"LOCAL_RANK": "1"}, False), ({"RANK": "3"}, False),
    ({"GROUP_RANK": "1", "LOCAL_RANK": "0"}, False), ({"SLURM_PROCID": "5"}, False)])
def test_only_the_global_first_process_creates_and_swaps_a_stage_folder(tmp_path, monkeypatch, env, first):
    """first_process decides it, and which process restores the logs on resume (training/trainer.py)."""
    from transferkit.stages.common import staged_output
    from transferkit.training import RANK_VARIABLES

    for var in RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("the previous outputs")
    (tmp_path / "out" / "params.yaml").write_text("seed: 1\n")
    with staged_output(tmp_path / "out", "seed: 0\n") as work:
        assert work.is_dir() == first  # another rank waits for rank 0's folder; it never makes or deletes one
        if first:
            (work / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == (["new.txt", "params.yaml"] if first
                                                                    else ["old.txt", "params.yaml"])
