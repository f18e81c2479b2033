"""The freeze_curve stage and the report's accuracy-vs-freeze-depth view."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import compose, run


def test_every_curve_point_is_a_lone_transfer_run_at_that_depth(smoke_artifacts, tmp_path):
    ref_cfg, _ = smoke_artifacts
    ref = Path(ref_cfg.paths.artifacts_dir)
    depths = list(ref_cfg.freeze_curve.depths)
    assert depths == [0]  # the smoke preset's curve
    shutil.copytree(ref, tmp_path / "artifacts", ignore=lambda d, names: ["transfer"] if Path(d) == ref else [])
    lone = compose("experiment=smoke", "transfer.freeze_depth=0", tmp=tmp_path)
    run("transfer", lone)
    # same seed, same settings, only the depth differs: bit for bit what `transferkit transfer
    # transfer.freeze_depth=0` gives, so a curve point and a sweep point can be compared
    assert (ref / "freeze_curve" / "depth0" / "metrics.json").read_bytes() == \
        (tmp_path / "artifacts" / "transfer" / "metrics.json").read_bytes()
    assert (ref / "freeze_curve" / "depth0" / "model.pt").read_bytes() == \
        (tmp_path / "artifacts" / "transfer" / "model.pt").read_bytes()


def test_evaluate_reports_accuracy_vs_freeze_depth(smoke_artifacts):
    cfg, _ = smoke_artifacts
    ev = Path(cfg.paths.artifacts_dir) / "evaluate"
    metrics = json.loads((ev / "metrics.json").read_text())
    rows = metrics["freeze_curve"]
    # the curve's depth 0 and the transfer stage's own depth 1, in depth order
    assert [(r["freeze_depth"], r["stage"]) for r in rows] == [(0, "freeze_curve"), (1, "transfer")]
    transfer_row = rows[1]
    assert transfer_row["top1"] == metrics["models"]["transfer"]["top1"]
    for r in rows:
        lo, hi = r["top1_ci95"]
        assert 0 <= lo <= r["top1"] <= hi <= 1
        assert 0 <= r["val_acc"] <= 1
        # float32 mean
        assert abs(r["vs_scratch"]["difference"] - (r["top1"] - metrics["models"]["scratch"]["top1"])) < 1e-6
    assert json.loads((ev / "freeze_curve.json").read_text()) == rows  # what `dvc plots show` draws
    assert (ev / "freeze_curve.png").stat().st_size > 5000
    report = (ev / "report.md").read_text()
    assert "## How many blocks to freeze?" in report
    assert "![accuracy vs freeze depth](freeze_curve.png)" in report
    assert "(best on val" in report  # ", tied with 1" where the smoke run's two depths score alike on val
    assert "data:image/png;base64" in (ev / "report.html").read_text()


def test_each_curve_row_carries_its_own_runs_val_accuracy(smoke_artifacts, tmp_path):
    """The report marks the depth to choose by each row's val accuracy: a row must carry the val_acc of the run
    that made it (the curve point's, transfer's), not one run's for every depth. The smoke run's depths tie on val,
    so each run's is set apart here."""
    from transferkit.stages.common import point_dir

    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    art = tmp_path / "artifacts"
    for folder, val in ((point_dir(art / "freeze_curve", 0), 0.125), (art / "transfer", 0.625)):
        metrics = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**metrics, "val_acc": val}))
    cfg = compose("experiment=smoke", "evaluate.latency_repeats=1", "evaluate.throughput_repeats=1", tmp=tmp_path)
    rows = run("evaluate", cfg)["freeze_curve"]
    assert [(r["freeze_depth"], r["stage"], r["val_acc"]) for r in rows] == [(0, "freeze_curve", 0.125),
                                                                             (1, "transfer", 0.625)]


def test_an_empty_curve_skips_the_stage_and_the_section(smoke_artifacts, tmp_path):
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    # transfer's own depth (1) is not trained again: an empty curve too
    cfg = compose("experiment=smoke", "freeze_curve.depths=[1]", tmp=tmp_path)
    run("freeze_curve", cfg)
    assert not list((tmp_path / "artifacts" / "freeze_curve").glob("depth*"))
    cfg = compose("experiment=smoke", "freeze_curve.depths=[]", tmp=tmp_path)
    metrics = run("evaluate", cfg)
    assert [r["stage"] for r in metrics["freeze_curve"]] == ["transfer"]
    assert "How many blocks to freeze" not in (tmp_path / "artifacts" / "evaluate" / "report.md").read_text()


def test_a_curve_depth_never_trained_fails_before_the_timings(smoke_artifacts, tmp_path, monkeypatch):
    """evaluate run with a curve freeze_curve did not train: the missing point is one line before the minutes of
    throughput and latency timing, not after them."""
    import pytest

    from transferkit.errors import TransferkitError
    from transferkit.evaluation import speed

    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    monkeypatch.setattr(speed, "cpu_throughput", lambda *a: pytest.fail("timed before the curve was read"))
    cfg = compose("experiment=smoke", "freeze_curve.depths=[0,2]", tmp=tmp_path)
    with pytest.raises(TransferkitError, match=r"freeze_curve/depth2/model.pt.*Fix: run the 'freeze_curve' stage"):
        run("evaluate", cfg)


def test_a_frozen_backbone_is_the_curves_deepest_point(smoke_artifacts, tmp_path):
    """transfer.backbone_lr_mult=0 trains the head alone whatever transfer.freeze_depth says: the transfer
    run is the point with every block frozen (it was filed under freeze_depth, 1)."""
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    cfg = compose("experiment=smoke", "transfer.backbone_lr_mult=0", "freeze_curve.depths=[]", tmp=tmp_path)
    metrics = run("evaluate", cfg)
    assert [(r["freeze_depth"], r["stage"]) for r in metrics["freeze_curve"]] == [(4, "transfer")]
    report = (tmp_path / "artifacts" / "evaluate" / "report.md").read_text()
    assert "probe depth=all" in report  # probe.depth null: every block, never "None"


def test_a_curve_depth_that_is_transfers_own_is_scored_from_the_transfer_stage(smoke_artifacts, tmp_path):
    """freeze_curve trains no point at transfer.freeze_depth (it leaves no folder for it): evaluate takes that
    depth's row from the transfer stage's model and metrics, listed among the curve's depths or not."""
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    cfg = compose("experiment=smoke", "freeze_curve.depths=[0,1]", tmp=tmp_path)
    assert cfg.transfer.freeze_depth == 1
    metrics = run("evaluate", cfg)
    assert [(r["freeze_depth"], r["stage"]) for r in metrics["freeze_curve"]] == [(0, "freeze_curve"), (1, "transfer")]
    transfer_row = metrics["freeze_curve"][1]
    assert transfer_row["top1"] == metrics["models"]["transfer"]["top1"]
    assert transfer_row["val_acc"] == json.loads((tmp_path / "artifacts" / "transfer" / "metrics.json").read_text())[
        "val_acc"]


def test_the_report_clips_intervals_to_what_an_accuracy_difference_can_be():
    # a handful of test images gives a normal-approximation interval wider than -100 to +100 points
    from transferkit.evaluation.report import freeze_curve_section

    rows = [{"freeze_depth": k, "val_acc": 0.5, "top1": 0.5, "top1_ci95": [0.1, 0.9],
             "vs_scratch": {"difference": 0.25, "ci95": [-1.3, 1.8]}} for k in (0, 1)]
    text = "\n".join(freeze_curve_section(rows, {"scratch": {"top1": 0.25}}, {"freeze_depth": 1}))
    assert text.count("+25.0 (-100.0 to +100.0)") == 2 and "-130.0" not in text and "+180.0" not in text


def test_a_run_killed_between_two_points_keeps_the_finished_one(smoke_artifacts, tmp_path, monkeypatch):
    """A finished point has no checkpoint left, and the next had none yet: the work folder is still the killed run's
    to resume, and its finished point is not trained again (the run gives its metrics as the killed run saved them)."""
    import pytest

    from transferkit.stages import freeze_curve

    ref = Path(smoke_artifacts[0].paths.artifacts_dir)
    shutil.copytree(ref, tmp_path / "artifacts", ignore=lambda d, names: ["freeze_curve"] if Path(d) == ref else [])
    cfg = compose("experiment=smoke", "freeze_curve.depths=[0,2]", "transfer.freeze_depth=1", tmp=tmp_path)
    trained, real = [], freeze_curve.transfer.run

    def killed_after_one(point, inputs, out):
        if trained:
            raise KeyboardInterrupt  # as a kill between the two points
        trained.append(point.transfer.freeze_depth)
        return real(point, inputs, out)

    monkeypatch.setattr(freeze_curve.transfer, "run", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run("freeze_curve", cfg)
    monkeypatch.setattr(freeze_curve.transfer, "run", lambda point, *a: trained.append(point.transfer.freeze_depth)
                        or real(point, *a))
    results = run("freeze_curve", cfg)
    assert trained == [0, 2]  # depth 0 once, in the killed run
    out = tmp_path / "artifacts" / "freeze_curve"
    assert results == {f"depth{d}": json.loads((out / f"depth{d}" / "metrics.json").read_text()) for d in (0, 2)}


def test_the_report_marks_the_depth_best_on_val():
    """The freeze curve's table marks one depth "(best on val)": the one with the highest val accuracy (the
    choice a reader is told to make by val), whatever its test accuracy; a row without a val score is never it."""
    from transferkit.evaluation.report import freeze_curve_section

    def row(depth, val, top1):
        return {"freeze_depth": depth, "val_acc": val, "top1": top1, "top1_ci95": [top1 - 0.1, top1 + 0.1],
                "vs_scratch": {"difference": 0.0, "ci95": [-0.1, 0.1]}}

    rows = [row(0, 0.40, 0.70), row(1, 0.65, 0.50), row(3, 0.55, 0.60), {**row(4, None, 0.80), "val_acc": None}]
    lines = freeze_curve_section(rows, {"scratch": {"top1": 0.5}}, {"freeze_depth": 1})
    marked = [ln for ln in lines if "(best on val)" in ln]
    assert len(marked) == 1 and marked[0].startswith("| 1 (best on val) | 65.0% |")
    # a tie on val (500 images: likely) is said, not hidden behind the first row's mark
    lines = freeze_curve_section([*rows[:2], row(3, 0.65, 0.60)], {"scratch": {"top1": 0.5}}, {"freeze_depth": 1})
    marked = [ln for ln in lines if "best on val" in ln]
    assert len(marked) == 1 and marked[0].startswith("| 1 (best on val, tied with 3) | 65.0% |")


def test_the_stages_of_several_fits_run_with_no_logger(smoke_artifacts, tmp_path):
    """trainer.loggers=[] (the schema allows it): each fit's own folder (freeze_curve's depth0/, prune's rounds/)
    had been made by a logger, and the first resume checkpoint into it failed with FileNotFoundError."""
    ref_cfg, _ = smoke_artifacts
    ref = Path(ref_cfg.paths.artifacts_dir)
    shutil.copytree(ref, tmp_path / "artifacts", ignore=lambda d, names: ["freeze_curve", "prune"] if Path(d) == ref
                    else [])
    # a checkpoint at every epoch end (the budget as large as the run): one is written into each fit's folder
    cfg = compose("experiment=smoke", "trainer.loggers=[]", "trainer.checkpoint_budget=1", "prune.sparse_epochs=1",
                  tmp=tmp_path)
    run("freeze_curve", cfg)
    run("prune", cfg)
    for stage in ("freeze_curve", "prune"):
        assert (tmp_path / "artifacts" / stage / "params.yaml").is_file()
    assert (tmp_path / "artifacts" / "freeze_curve" / "depth0" / "model.pt").is_file()
    assert not list((tmp_path / "artifacts").rglob("checkpoints"))  # finished: nothing to resume left
