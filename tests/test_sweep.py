"""Sweeps as users run them: a Hydra multirun over freeze depth (and seeds) into one folder
per point, checked before the first point trains, resumable after a crash, under DDP without
duplicate folders, and collected into one table and plot."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import cli, compose, one_error_line, run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """prepare + pretrain of the smoke experiment: the inputs every sweep point reads."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = compose("experiment=smoke", tmp=tmp)
    run("prepare", cfg)
    run("pretrain", cfg)
    return tmp


def _sweep(base, sweep_dir, stage, *overrides):
    proc = cli(stage, "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
               f"hydra.sweep.dir={sweep_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_multirun_writes_one_folder_per_point_and_resumes(base, tmp_path):
    sweep = tmp_path / "sweep"
    _sweep(base, sweep, "transfer", "transfer.freeze_depth=0,2")
    points = {p.name for p in sweep.iterdir() if p.is_dir()}
    assert points == {"transfer.freeze_depth=0", "transfer.freeze_depth=2"}
    for depth in (0, 2):
        out = sweep / f"transfer.freeze_depth={depth}" / "transfer"
        assert (out / "model.pt").exists() and (out / "metrics.json").exists()
        assert yaml.safe_load((out / "params.yaml").read_text())["transfer"]["freeze_depth"] == depth
    # the pipeline's own outputs are inputs here, never overwritten by a sweep
    assert not (base / "artifacts" / "transfer").exists()

    # a crash lost point 2 (its folder never got swapped in); the rerun trains only that one
    kept = sweep / "transfer.freeze_depth=0" / "transfer" / "model.pt"
    stamp = kept.stat().st_mtime_ns
    shutil.rmtree(sweep / "transfer.freeze_depth=2" / "transfer")
    proc = _sweep(base, sweep, "transfer", "transfer.freeze_depth=0,2")
    assert "already finished with this config; skipped" in proc.stdout
    assert kept.stat().st_mtime_ns == stamp
    assert (sweep / "transfer.freeze_depth=2" / "transfer" / "model.pt").exists()

    # a finished point made by another config is refused, not reused or overwritten
    saved = sweep / "transfer.freeze_depth=0" / "transfer" / "params.yaml"
    saved.write_text(saved.read_text().replace("epochs: 6", "epochs: 7", 1))
    line = one_error_line(cli("transfer", "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
                              f"hydra.sweep.dir={sweep}", "transfer.freeze_depth=0"))
    assert "different config" in line and "epochs" in line and "hydra.sweep.dir" in line
    assert kept.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("overrides, needle", [
    (["transfer.freeze_depth=0,9"], "transfer.freeze_depth=9"),           # beyond the 4 blocks of fastnet_tiny
    (["transfer.freeze_depth=range(3,6)"], "transfer.freeze_depth=5"),
    (["transfer.freez_depth=0,1"], "freez_depth"),                         # unknown key
    (["transfer.freeze_depth=0,1", "transfer.lr=-1"], "transfer.lr"),
])
def test_bad_sweeps_fail_before_any_point_trains(base, tmp_path, overrides, needle):
    sweep = tmp_path / "sweep"
    proc = cli("transfer", "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
               f"hydra.sweep.dir={sweep}", *overrides)
    assert needle in one_error_line(proc)
    assert not sweep.exists()


@pytest.mark.slow
def test_ddp_multirun_makes_no_duplicate_folders(base, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(base, sweep, "transfer", "transfer.freeze_depth=0,1", "trainer=ddp",
                  "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_threads=1")
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    # trainer.* overrides are part of each point's name; exactly one folder per point
    assert len(points) == 2 and all("transfer.freeze_depth=" in p for p in points), points
    for p in points:
        assert sorted(x.name for x in (sweep / p).iterdir() if x.is_dir()) == [".hydra", "transfer"]
        assert (sweep / p / "transfer" / "model.pt").exists()
    assert proc.stdout.count("Launching 2 jobs") + proc.stderr.count("Launching 2 jobs") == 1


@pytest.fixture(scope="module")
def collected_sweep(base, tmp_path_factory):
    sweep = tmp_path_factory.mktemp("collect") / "sweep"
    _sweep(base, sweep, "transfer", "seed=0,1", "transfer.freeze_depth=0,1,2")
    _sweep(base, sweep, "scratch", "seed=0,1")
    _sweep(base, sweep, "probe", "seed=0")
    return sweep


@pytest.mark.slow
def test_collect_makes_one_table_and_plot(collected_sweep, base, tmp_path):
    proc = cli("collect", str(collected_sweep), "--out", str(tmp_path / "out"), cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    rows = {r["label"]: r for r in summary["rows"]}
    assert set(rows) == {"transfer transfer.freeze_depth=0", "transfer transfer.freeze_depth=1",
                         "transfer transfer.freeze_depth=2", "scratch", "probe"}
    depth1 = rows["transfer transfer.freeze_depth=1"]
    assert depth1["seeds"] == [0, 1] and len(depth1["runs"]) == 2
    accs = [r["test_acc"] for r in depth1["runs"]]
    assert abs(depth1["test_mean"] - sum(accs) / 2) < 1e-9
    # two seeds on both sides: the interval comes from the spread across seeds
    assert "by seed" in depth1["vs_scratch"]["method"]
    lo, hi = depth1["vs_scratch"]["ci95"]
    assert lo <= depth1["vs_scratch"]["difference"] <= hi
    # one transfer point is marked as the choice, and it is the best on val
    chosen = [r for r in summary["rows"] if r["chosen_on_val"]]
    assert len(chosen) == 1 and chosen[0]["val_mean"] == max(
        r["val_mean"] for r in summary["rows"] if r["stage"] == "transfer")
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "best on val" in table and "| scratch | 2 |" in table
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 10_000


@pytest.mark.slow
def test_collect_refuses_folders_from_different_configs(collected_sweep, base, tmp_path):
    # two points whose runs disagree on a setting that no override changed
    mixed = tmp_path / "mixed"
    shutil.copytree(collected_sweep / "seed=0", mixed / "a")
    shutil.copytree(collected_sweep / "seed=1", mixed / "b")
    p = mixed / "b" / "scratch" / "params.yaml"
    params = yaml.safe_load(p.read_text())
    params["scratch"]["weight_decay"] = 0.001
    p.write_text(yaml.safe_dump(params))
    line = one_error_line(cli("collect", str(mixed), "--out", str(tmp_path / "out"), cwd=base))
    assert "scratch.weight_decay" in line and "different configs" in line


def test_collect_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(cli("collect", str(tmp_path / "empty")))
    assert "no finished runs" in line
