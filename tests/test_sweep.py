"""Sweeps as users run them: a Hydra multirun over freeze depth (and seeds) into one folder
per point, checked before the first point trains, under DDP without duplicate folders; the same
sweep as DVC stages (`transferkit sweep`), where a rerun trains only what is missing; and
collected into one table and plot."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli, compose, dvc_project, made_once, one_error_line, run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """prepare + pretrain of the smoke experiment: the inputs every sweep point reads."""
    def make(tmp):
        cfg = compose("experiment=smoke", tmp=tmp)
        run("prepare", cfg)
        run("pretrain", cfg)

    return made_once(tmp_path_factory, "sweep", make)


def _sweep(base, sweep_dir, stage, *overrides):
    proc = cli(stage, "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
               f"hydra.sweep.dir={sweep_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_multirun_writes_one_folder_per_point(base, tmp_path):
    sweep = tmp_path / "sweep"
    shown = _sweep(base, sweep, "transfer", "transfer.freeze_depth=0,2").stdout
    points = {p.name for p in sweep.iterdir() if p.is_dir()}
    assert all(f"transfer: outputs in {sweep / p / 'transfer'}\n" in shown for p in points), shown  # where each went
    assert points == {"transfer.freeze_depth=0", "transfer.freeze_depth=2"}
    for depth in (0, 2):
        out = sweep / f"transfer.freeze_depth={depth}" / "transfer"
        assert (out / "model.pt").exists() and (out / "metrics.json").exists()
        assert yaml.safe_load((out / "params.yaml").read_text())["transfer"]["freeze_depth"] == depth
    # the pipeline's own outputs are inputs here, never overwritten by a sweep
    assert not (base / "artifacts" / "transfer").exists()


@pytest.mark.slow
def test_dvc_sweep_runs_only_the_points_not_done(base, tmp_path, server_dir, one_thread, monkeypatch, capsys):
    """In a project whose params.yaml is the smoke experiment: the points compose as it does. The
    points train warm (TRANSFERKIT_WARM=1), as test_scenarios_end_to_end's stages do."""
    monkeypatch.setenv("TRANSFERKIT_WARM", "1")
    from transferkit.config.compose import params_text
    from transferkit.project import copy_project

    out, composed_with = tmp_path / "dvc-sweep", ["experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}"]
    proj = copy_project(ROOT, tmp_path / "proj", params_text(compose(*composed_with), composed_with))

    def sweep(depths: str, seeds: str = "0"):
        proc = cli("sweep", "transfer", f"transfer.freeze_depth={depths}", f"seed={seeds}", "--out", str(out), cwd=proj)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    first = sweep("0,2")
    assert "2 of 2 points ran\n" in first and not (out.parent / f".{out.name}.lock").exists()  # its lock goes
    # each point as it starts, not nothing until the whole sweep ends
    assert first.index("running point seed=0,transfer.freeze_depth=0\n") < first.index(
        "running point seed=0,transfer.freeze_depth=2\n") < first.index("2 of 2 points ran")
    assert first.endswith(f"Each point's outputs are in {out}/POINT/transfer/, this table in "
                          f"{out}/collected/sweep.md.\n")
    # a point's code deps are its stage's source files, as in dvc.yaml: the package folder would hold the
    # bytecode later imports write (every point done would be stale) and files that change no result
    from transferkit.config.dvcyaml import code_files
    from transferkit.stages import BY_NAME

    point0 = yaml.safe_load((out / "dvc.yaml").read_text())["stages"]["point0"]
    assert [d for d in point0["deps"] if "transferkit" in d] == code_files(BY_NAME["transfer"])
    # kept while DVC runs the point again (as in the project's dvc.yaml): a Ctrl+C then leaves the earlier outputs
    assert point0["outs"] == [{"seed=0,transfer.freeze_depth=0/transfer": {"persist": True}}]
    # and its params the keys transfer's entry in dvc.yaml tracks and the evaluate settings collect scores with:
    # another stage's setting, or evaluate's timings, rerun no point
    tracked = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["transfer"]["params"]
    assert point0["params"] == [{"params/seed=0,transfer.freeze_depth=0.yaml": [*tracked, "evaluate.batch_size",
                                                                                 "evaluate.tta"]}]
    # a point is named by every override given, varying or not (seed=0 here)
    assert yaml.safe_load((out / "params" / "seed=0,transfer.freeze_depth=0.yaml").read_text())["name"] == "smoke"
    kept = out / "seed=0,transfer.freeze_depth=0" / "transfer" / "model.pt"
    stamp = kept.stat().st_mtime_ns
    grown = sweep("0,2,3")  # a point added: only it trains
    assert "1 of 3 points ran; 2 done already" in grown and "| transfer transfer.freeze_depth=3 |" in grown
    assert grown.count("running point") == 1 and "running point seed=0,transfer.freeze_depth=3\n" in grown
    assert kept.stat().st_mtime_ns == stamp
    shutil.rmtree(kept.parent)  # an output deleted by hand comes back from DVC's cache, untrained
    assert "0 of 3 points ran; 3 done already" in sweep("0,2,3") and kept.exists()
    # an axis of one value grown: the points done keep their names, and the table is this sweep's points only
    seeds = sweep("0", "0,1")
    assert "1 of 2 points ran" in seeds and "| transfer ← best on val | 2 |" in seeds and "depth=3" not in seeds
    # collect on the folder takes the points its dvc.yaml lists now, not the earlier sweeps' left on disk
    from transferkit.errors import TransferkitError
    from transferkit.sweep.collect import find_runs

    assert (out / "seed=0,transfer.freeze_depth=3").is_dir()
    points = sorted(r.folder.parent.name for r in find_runs([out]))
    assert points == [f"seed={s},transfer.freeze_depth=0" for s in (0, 1)]
    # a scratch sweep into the folder would replace its dvc.yaml and its point0's record in dvc.lock (walk P88)
    before = (out / "dvc.yaml").read_text()
    proc = cli("sweep", "scratch", "seed=0", "--out", str(out), cwd=proj)
    assert proc.returncode == 2 and "lists the runs of `transferkit sweep transfer`" in proc.stderr, proc.stderr
    assert (out / "dvc.yaml").read_text() == before and not (out / "seed=0" / "scratch").exists()
    again = sweep("0", "0,1")
    assert "0 of 2 points ran; 2 done already" in again and "| scratch" not in again
    # a sweep stopped before it finished: a point's settings are new, its output is older (DVC would run it again)
    point = out / "params" / "seed=1,transfer.freeze_depth=0.yaml"
    settings = yaml.safe_load(point.read_text())
    settings["transfer"]["epochs"] += 1
    point.write_text(yaml.safe_dump(settings))
    with pytest.raises(TransferkitError, match=r"has outputs not made with their settings and code as they are now "
                                               r"\(seed=1,transfer.freeze_depth=0/transfer\).*Fix: run the command "
                                               r"that made them again"):
        find_runs([out])
    # a point with no run at all (failed: a diverged one fails again, which the fix above cannot mend) is left out
    # and named, as a multirun's failed job is: the finished points are collected (walk I84)
    point.write_text(yaml.safe_dump({**settings, "transfer": {**settings["transfer"],
                                                              "epochs": settings["transfer"]["epochs"] - 1}}))
    shutil.rmtree(out / "seed=1,transfer.freeze_depth=0")
    assert [r.folder.parent.name for r in find_runs([out])] == ["seed=0,transfer.freeze_depth=0"]
    assert capsys.readouterr().err.endswith(
        f"transferkit collect: 1 of 2 points in {out.resolve()} have no finished run (failed, killed or not run yet) "
        f"and are left out: seed=1,transfer.freeze_depth=0/transfer\n")


@pytest.mark.slow
def test_a_failed_point_stops_no_other_point_and_the_finished_ones_are_tabled(base, tmp_path, one_thread):
    """A sweep runs for hours: a point that fails (an lr that diverges) leaves DVC running the points after it
    (dvc repro --keep-going); its error shows as it comes, the table of those that finished is printed, and the
    sweep ends in the failure, naming the point, exit 2."""
    from transferkit.config.compose import params_text
    from transferkit.project import copy_project

    out, composed_with = tmp_path / "dvc-sweep", ["experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}"]
    proj = copy_project(ROOT, tmp_path / "proj", params_text(compose(*composed_with), composed_with))
    proc = cli("sweep", "transfer", "transfer.lr=1e+30,0.01", "--out", str(out), cwd=proj)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert yaml.safe_load((out / "dvc.yaml").read_text())["stages"]["point0"]["outs"] == [
        {"transfer.lr=1e+30/transfer": {"persist": True}}]  # the failed point comes first: DVC went on past it
    assert ("running point transfer.lr=1e+30\ntransferkit transfer: error: training diverged: " in proc.stdout
            and "running point transfer.lr=0.01\n" in proc.stdout)
    assert (out / "transfer.lr=0.01" / "transfer" / "model.pt").is_file()
    assert not (out / "transfer.lr=1e+30" / "transfer").exists()
    assert "| transfer ← best on val | 1 |" in proc.stdout  # one row: the point that finished
    assert (f"1 of 2 points in {out.resolve()} have no finished run (failed, killed or not run yet) and are left "
            f"out: transfer.lr=1e+30/transfer") in proc.stderr
    assert ("transferkit sweep: error: point transfer.lr=1e+30 failed; `dvc repro --keep-going` exited with code"
            in proc.stderr)
    assert proc.stderr.endswith("ERROR: failed to reproduce 'point0'\n")


def test_only_a_point_with_no_run_is_left_out_a_stale_prepare_or_run_is_refused(tmp_path, monkeypatch, capsys):
    """collect leaves out a point DVC would run that has no output at all (failed, killed, not run yet), naming it;
    an out-of-date output of any other kind (a scenarios quadrant's prepare made by older code, which its
    strategies would be scored on; a point's earlier run) is refused, as before (review of walk I84's fix)."""
    from transferkit.errors import TransferkitError
    from transferkit.project import RUNS_HEADER, stage_run
    from transferkit.sweep import collect

    stages = {"q-prepare": stage_run("prepare", "params/q.yaml", "q/prepare", {}, []),
              "q-fine_tune": stage_run("transfer", "params/q.yaml", "q/fine_tune", {"prepare": "q/prepare"}, []),
              "q-scratch": stage_run("scratch", "params/q.yaml", "q/scratch", {"prepare": "q/prepare"}, [])}
    (tmp_path / "dvc.yaml").write_text(RUNS_HEADER + yaml.safe_dump({"stages": stages}))
    (tmp_path / "q" / "prepare").mkdir(parents=True)
    (tmp_path / "q" / "fine_tune").mkdir()
    for stale, refused in ((["q-scratch"], None), (["q-scratch", "q-prepare"], "q/prepare"),
                           (["q-fine_tune"], "q/fine_tune")):
        monkeypatch.setattr(collect, "stale_stages", lambda home, stale=stale: stale)
        if refused:
            with pytest.raises(TransferkitError, match=rf"has outputs not made with their settings and code as they "
                                                       rf"are now \({refused}\)"):
                collect.run_roots(tmp_path)
        else:
            assert sorted(str(root.relative_to(tmp_path)) for root, *_ in collect.run_roots(tmp_path)) == [
                "q/fine_tune", "q/prepare"]
            assert capsys.readouterr().err == (f"transferkit collect: 1 of 2 points in {tmp_path.resolve()} have no "
                                               f"finished run (failed, killed or not run yet) and are left out: "
                                               f"q/scratch\n")


@pytest.mark.parametrize("command", ["transferkit.sweep.points", "transferkit.scenarios.report"])
def test_a_folder_with_a_pipeline_of_its_own_is_never_overwritten(tmp_path, command):
    """`--out .` in a project: the runs' dvc.yaml and params/ would replace and litter the project's."""
    import importlib

    from transferkit.errors import TransferkitError

    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: transferkit prepare --params params.yaml\n")
    argv = ["transfer", "transfer.freeze_depth=0"] if command.endswith("points") else ["seed=1"]
    with pytest.raises(TransferkitError, match=r"dvc.yaml was not written by a sweep or scenarios run.*Fix: pass"):
        importlib.import_module(command).main([*argv, "--out", str(project)])
    assert [p.name for p in project.iterdir()] == ["dvc.yaml"] and "prepare" in (project / "dvc.yaml").read_text()


@pytest.mark.parametrize("command", ["transferkit.sweep.points", "transferkit.scenarios.report"])
def test_a_folder_of_other_files_is_no_runs_folder(tmp_path, command):
    """`--out artifacts` (or a Hydra multirun's folder, docs/) became a DVC repository of its own inside the
    project's, whose `dvc status` then called every stage's outputs modified."""
    import importlib

    from transferkit.errors import TransferkitError
    from transferkit.project import check_runs_folder

    folder = tmp_path / "artifacts"
    (folder / "prepare").mkdir(parents=True)
    argv = ["transfer", "transfer.freeze_depth=0"] if command.endswith("points") else ["seed=1"]
    with pytest.raises(TransferkitError, match=r"artifacts holds prepare and no sweep or scenarios run: .*Fix: pass"):
        importlib.import_module(command).main([*argv, "--out", str(folder)])
    assert [p.name for p in folder.iterdir()] == ["prepare"]
    # as collect's --out: nowhere in what a project's dvc.yaml tracks (its data/ input, its outputs), nor its conf/
    project = dvc_project(tmp_path / "project", {"prepare": {"cmd": "x", "deps": ["data"],
                                                             "outs": ["artifacts/prepare"]}})
    for out in (project / "data" / "sw", project / "artifacts" / "prepare" / "sw", project / "conf" / "sw"):
        with pytest.raises(TransferkitError, match=r"^--out .*(lies in|in the project's conf/).* Fix: --out a new"):
            importlib.import_module(command).main([*argv, "--out", str(out)])
        assert not out.exists()
    (tmp_path / "stopped" / "params").mkdir(parents=True)  # a run that stopped before its dvc.yaml: its own
    check_runs_folder(tmp_path / "stopped")
    check_runs_folder(tmp_path / "new")


@pytest.mark.parametrize("command", ["transferkit.sweep.points", "transferkit.scenarios.report"])
def test_a_runs_folder_of_another_command_is_refused(tmp_path, command):
    """`scenarios --out` a sweep's folder replaced the sweep's dvc.yaml, and collect then found none of its points
    (walk P88): a runs folder takes the runs of the command its header names, and of any command where it names
    none (written before the header did)."""
    import importlib

    from transferkit.errors import TransferkitError
    from transferkit.project import MADE_BY, RUNS_HEADER, check_runs_folder

    argv = ["transfer", "transfer.freeze_depth=0"] if command.endswith("points") else ["seed=1"]
    folder = tmp_path / "runs"
    folder.mkdir()
    for other in ("sweep scratch", "scenarios" if command.endswith("points") else "sweep transfer"):
        earlier = f"{RUNS_HEADER}{MADE_BY}{other}\nstages: {{}}\n"
        (folder / "dvc.yaml").write_text(earlier)
        with pytest.raises(TransferkitError, match=rf"runs/dvc.yaml lists the runs of `transferkit {other}`, and "
                                                   rf"`transferkit (sweep transfer|scenarios)` would replace it: "
                                                   rf"collect .* Fix: pass --out a new folder"):
            importlib.import_module(command).main([*argv, "--out", str(folder)])
        assert (folder / "dvc.yaml").read_text() == earlier and sorted(p.name for p in folder.iterdir()) == ["dvc.yaml"]
    (folder / "dvc.yaml").write_text(f"{RUNS_HEADER}{MADE_BY}sweep scratch\nstages: {{}}\n")
    check_runs_folder(folder, "sweep scratch")  # its own command's
    (folder / "dvc.yaml").write_text(f"{RUNS_HEADER}stages: {{}}\n")  # an older run's: no command named
    check_runs_folder(folder, "scenarios")


@pytest.mark.parametrize("command", ["transferkit.sweep.points", "transferkit.scenarios.report"])
def test_a_second_run_into_a_runs_folder_in_use_is_refused(tmp_path, command):
    """Two sweeps into one folder at once: the second would rewrite dvc.yaml under the first, whose table would then
    lack its own points and blame them for being unfinished."""
    import importlib

    from transferkit.errors import TransferkitError
    from transferkit.stages.common import exclusive

    out, artifacts = tmp_path / "runs", tmp_path / "artifacts"
    for name in ("prepare", "pretrain"):  # the inputs a sweep of transfer checks for first
        (artifacts / name).mkdir(parents=True)
    argv = (["transfer", "transfer.freeze_depth=0", f"paths.artifacts_dir={artifacts}"] if command.endswith("points")
            else ["--only", "small_similar"])
    with exclusive(out, "held by the test"):
        with pytest.raises(TransferkitError, match=r"another run \(process \d+\) is writing .*runs: two runs into one "
                                                   r"folder at once would replace each other's dvc.yaml.* Fix: wait"):
            importlib.import_module(command).main([*argv, "--out", str(out)])
    assert not out.exists()


def test_a_sweep_whose_inputs_are_not_made_names_the_stage_to_run(tmp_path, monkeypatch):
    from transferkit.config.compose import params_text
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import main

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke"), ["experiment=smoke"]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferkitError, match=rf"^{tmp_path}/artifacts/prepare does not exist, and transfer reads "
                                               r"it\. Fix: make it \(`dvc repro prepare`\) and sweep in the "
                                               rf"project's folder {tmp_path}\.$"):
        main(["transfer", "seed=0,1"])
    assert not (tmp_path / "sweeps").exists()
    (tmp_path / "artifacts" / "prepare").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path / "docs")  # the folder is there: the path says where the sweep looked, the fix to go
    with pytest.raises(TransferkitError, match=rf"^{tmp_path}/docs/artifacts/prepare does not exist, and transfer "
                                               rf"reads it\. Fix: sweep in the project's folder {tmp_path}\.$"):
        main(["transfer", "seed=0,1"])
    monkeypatch.chdir(tmp_path)  # another artifacts folder: `dvc repro` fills the project's own, not that one
    with pytest.raises(TransferkitError, match=rf"^{tmp_path}/elsewhere/prepare does not exist, and transfer reads "
                                               r"it\. Fix: make it \(`transferkit prepare` with the same "
                                               r"paths.artifacts_dir; `dvc repro prepare` fills the project's own "
                                               r"folder\), or sweep without paths.artifacts_dir\.$"):
        main(["transfer", "seed=0,1", f"paths.artifacts_dir={tmp_path / 'elsewhere'}"])


def test_a_sweep_refuses_a_setting_its_stage_does_not_read_given_on_its_command_line(tmp_path, monkeypatch):
    """One value of it trained the stage unchanged, under a name saying otherwise; one that params.yaml records,
    or one the stage's own setting follows where conf/ is composed (scratch.epochs: ${transfer.epochs}), is fine."""
    from transferkit.config.compose import params_text
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import main

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    recorded = ["experiment=smoke", "probe.depth=2"]
    (tmp_path / "params.yaml").write_text(params_text(compose(*recorded), recorded))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferkitError, match=r"^transfer does not read probe.depth: 'probe.depth=1' would change"):
        main(["transfer", "probe.depth=1", "seed=0,1"])
    for argv in (["transfer", "seed=0,1"], ["scratch", "transfer.epochs=1,2"]):  # on to the inputs it lacks
        with pytest.raises(TransferkitError, match=r"/artifacts/prepare does not exist"):
            main(argv)


@pytest.mark.parametrize("axis", ["evaluate.tta=none,flip", "trainer.precision=32-true,bf16-mixed", "seed=0,1"])
def test_points_that_train_or_score_differently_are_a_sweep(tmp_path, axis):
    """collect scores each run with its own evaluate.tta; precision changes what a run computes."""
    from transferkit.sweep.points import check_points

    base = ["experiment=smoke", f"paths.artifacts_dir={tmp_path}", *(["seed=0"] if "seed" not in axis else [])]
    assert len(check_points("transfer", [*base, axis])) == 2


def test_a_missing_input_is_refused_before_dvc_removes_any_output(tmp_path):
    """DVC stops at a missing dep only after removing that stage's outputs (a finished point's model)."""
    from transferkit.errors import TransferkitError
    from transferkit.project import RUNS_HEADER, run_pipeline, stage_run

    out, missing = tmp_path / "runs", tmp_path / "artifacts" / "pretrain"
    (out / "seed=0" / "transfer").mkdir(parents=True)
    (out / "seed=0" / "transfer" / "model.pt").write_text("a finished point")
    (out / "dvc.yaml").write_text(RUNS_HEADER + "stages: {}\n")  # the sweep's, from its earlier run
    (tmp_path / "artifacts" / "prepare").mkdir(parents=True)
    (tmp_path / "artifacts" / "prepare" / "target.pt").write_text("a prepared task")
    inputs = {"prepare": str(tmp_path / "artifacts" / "prepare"), "pretrain": str(missing)}
    stages = {"point0": stage_run("transfer", "params/seed=0.yaml", "seed=0/transfer", inputs, [])}
    with pytest.raises(TransferkitError, match=rf"{missing}/model\.pt does not exist, and point0 reads it\. Fix:"):
        run_pipeline(out, stages)
    assert sorted(p.name for p in out.iterdir()) == ["dvc.yaml", "seed=0"]
    assert (out / "seed=0" / "transfer" / "model.pt").read_text() == "a finished point"


def test_a_full_disk_while_writing_the_runs_dvc_yaml_leaves_the_earlier_one(tmp_path, monkeypatch):
    """A dvc.yaml cut off as it was written would make the folder refuse every rerun (not written by a sweep)."""
    import errno
    import pathlib

    from transferkit.errors import TransferkitError
    from transferkit.project import RUNS_HEADER, check_runs_folder, run_pipeline, stage_run

    out, earlier = tmp_path / "runs", RUNS_HEADER + "stages: {}\n"
    (out / ".dvc").mkdir(parents=True)  # a DVC repository already: nothing runs dvc init
    (out / "dvc.yaml").write_text(earlier)
    real = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    stages = {"point0": stage_run("transfer", "params/seed=0.yaml", "seed=0/transfer", {}, [])}
    with pytest.raises(TransferkitError, match="the disk is full"):
        run_pipeline(out, stages)
    monkeypatch.undo()
    assert (out / "dvc.yaml").read_text() == earlier
    check_runs_folder(out)  # still the sweep's folder: a rerun is taken


def test_a_sweep_in_a_project_whose_params_record_no_overrides_is_refused(tmp_path, monkeypatch):
    """`dvc exp run -S experiment=smoke -S transfer.lr=0.2` writes params.yaml without the overrides line:
    composed again from what it names (the experiment), the points would lose transfer.lr silently."""
    from transferkit.config.compose import params_text
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import main

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke", "transfer.lr=0.2")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferkitError, match=r"params.yaml is not conf/ composed with experiment=smoke \(scratch.lr: "
                                               r"params.yaml has 0.2, conf/ composes 0.05; 1 more\).*Fix: run "
                                               r"`transferkit params experiment=smoke` to compose conf/ as it is now, "
                                               r"or `transferkit params experiment=smoke transfer.lr=0.2` to keep"):
        main(["transfer", "seed=0,1"])
    assert not (tmp_path / "sweeps").exists()


def test_params_without_overrides_whose_name_is_no_experiment_are_compared_with_the_default(tmp_path):
    """`dvc exp run -S name=mine` writes params.yaml without the overrides line and with a name conf/experiment/ does
    not hold: the check names the key that differs, not an experiment=mine the user never typed."""
    from transferkit.config.compose import params_text, project_overrides

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke")))
    assert project_overrides(tmp_path / "params.yaml") == ["experiment=smoke"]
    (tmp_path / "params.yaml").write_text(params_text(compose("name=mine")))
    assert project_overrides(tmp_path / "params.yaml") == []


def test_an_override_with_a_line_break_is_refused_before_it_breaks_the_params_files_header(tmp_path, monkeypatch):
    """The header records the overrides on one comment line: a line break in one ended the comment and made the rest
    settings, and every later `transferkit params` and `check-params` stopped on the unclosed quote it left."""
    from transferkit.config.compose import OVERRIDES_LINE, params_text, project_overrides, write_generated
    from transferkit.errors import TransferkitError

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(before := params_text(compose("experiment=smoke"), ["experiment=smoke"]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferkitError, match=r"^\"name='smoke\\nrun'\" holds a line break, which would end the "
                                               r"params file's comment line of overrides .* Fix: write the value on"):
        write_generated(["experiment=smoke", "name='smoke\nrun'"])
    assert (tmp_path / "params.yaml").read_text() == before and not (tmp_path / "dvc.yaml").exists()
    # a header broken by hand (an unclosed quote) is read as no record: the experiment it names
    (tmp_path / "params.yaml").write_text(before.replace(OVERRIDES_LINE.rstrip() + " experiment=smoke",
                                                         OVERRIDES_LINE.rstrip() + " 'name=smoke"))
    assert project_overrides(tmp_path / "params.yaml") == ["experiment=smoke"]


def test_a_point_is_named_by_the_overrides_given():
    from transferkit.sweep.points import point_name

    point = ["experiment=smoke", "seed=0", "distill.student_init=/runs/a/model.pt", "transfer.freeze_depth=2"]
    assert point_name(point, {"transfer.freeze_depth", "seed", "distill.student_init"}) == \
        "distill.student_init=%2Fruns%2Fa%2Fmodel.pt,seed=0,transfer.freeze_depth=2"  # one folder, not three
    assert point_name(point, set()) == "default"  # params.yaml's overrides (experiment=smoke) name nothing
    # a setting that changes no result, added on a rerun, renames nothing: DVC would train every point again
    given = {"transfer.freeze_depth", "seed", "trainer.progress_bar", "trainer.num_threads"}
    assert point_name([*point, "trainer.progress_bar=false", "trainer.num_threads=1"], given) == \
        "seed=0,transfer.freeze_depth=2"
    # a setting is left out with the keys inside it, not with every key its name begins like
    assert point_name(["trainer.progress_bar_x=1", "pathsx=2"], {"trainer.progress_bar_x", "pathsx"}) == \
        "pathsx=2,trainer.progress_bar_x=1"


@pytest.mark.parametrize("option", ["--dry-run", "--uot=/elsewhere"])
def test_sweep_refuses_an_unknown_option(option, tmp_path):
    from transferkit.sweep.points import main

    from transferkit.errors import TransferkitError

    with pytest.raises(TransferkitError, match=f"unrecognized arguments: {option}"):
        main(["transfer", option, "transfer.freeze_depth=0,1", "--out", str(tmp_path)])  # not into the checkout


def test_a_sweep_of_values_hydra_cannot_list_is_one_line():
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import expand

    with pytest.raises(TransferkitError, match=r"cannot list the values of transfer.lr=interval\(0.01,0.1\): .*INTERVAL"
                                               r".*Fix: list them"):
        expand(["transfer.lr=interval(0.01,0.1)"])


@pytest.mark.parametrize("overrides, needle", [
    (["seed=range(3,0)"], r"seed=range\(3,0\) lists no values\. Fix: key='range\(start,stop,step\)' with start < stop "
                          r"\(start > stop when step < 0\)"),
    (["transfer.freeze_depth=0,1,1"], r"transfer.freeze_depth=0,1,1 lists 1 twice\. Fix: list each value once"),
    (["transfer.lr=0.1,0.10"], r"transfer.lr=0.1,0.10 lists 0.1 twice"),  # one number to Hydra
    (["transfer.lr=1,1.0"], r"transfer.lr=1,1.0 lists 1 and 1.0, one value twice\. Fix"),  # int and float: one lr
    (["name=a,'a'"], r"name=a,'a' lists a and 'a', one value twice"),
    (["seed=range(0,3,-1)"], r"lists no values\. Fix: .*\(start > stop when step < 0\)"),
    (["seed=range(0,3,0)"], r"cannot list the values of seed=range\(0,3,0\): .*zero\. Fix: .*a step that is not 0"),
    (["seed=range(1,3),2"], r"seed=range\(1,3\),2 puts a sweep among listed values\. Fix: list every value"),
    (["x=[1,2],[1,2.0]"], r"x=\[1,2\],\[1,2.0\] lists \[1,2\] and \[1,2.0\], one value twice"),  # one list
    (["x={a:1,b:2},{b:2,a:1}"], r"lists \{a:1,b:2\} and \{b:2,a:1\}, one value twice"),  # one dict
    (["x=nan,nan"], r"x=nan,nan lists nan twice"),  # nan is not equal to itself, yet one value
    (["seed=0,1", "seed=2"], r"seed is given more than once \(seed=0,1 and seed=2\): the last would set it in every "
                             r"point\. Fix: give each swept key once"),
    (["transfer.lr=0.1,0.2", "++transfer.lr=0.3"], r"transfer.lr is given more than once \(transfer.lr=0.1,0.2 and "
                                                 r"\+\+transfer.lr=0.3\)"),
])
def test_a_sweep_that_lists_a_point_twice_or_none_is_one_line(overrides, needle):
    """An empty range ended in a traceback; a value listed twice, or a swept key given again, made points that
    are one run, named by a message with blanks where their differences go."""
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import expand

    with pytest.raises(TransferkitError, match=needle):
        expand(overrides)
    assert expand(["seed=1", "seed=2"]) == [["seed=1", "seed=2"]]  # a value given again: the last one wins
    assert expand(["seed=0", "seed=0,1"]) == [["seed=0", "seed=0"], ["seed=0", "seed=1"]]  # the sweep is the last
    assert len(expand(["x=1,true"])) == 2  # equal in Python, yet a number and a boolean
    assert len(expand(["x=[1],[true]", "y={a:1},{a:2}"])) == 4
    quoted = ["a='1'", "c=[1,'2']", "d='null'", "e='true'"]  # quotes kept: text, not a number, null or a bool
    assert expand(quoted) == [quoted]
    swept = [["a='1'", "c=[1,'2']"], ["a='1'", "c=[3]"], ["a='2'", "c=[1,'2']"], ["a='2'", "c=[3]"]]
    assert expand(["a='1','2'", "c=[1,'2'],[3]"]) == swept  # a sweep's values keep their quotes too
    assert len(expand(["n='1.0','1'"])) == 2  # two texts, though one number unquoted


def test_a_shuffled_sweep_names_the_values_it_lists_twice():
    """shuffle() reordered the values once to find a repeat and again to name it: the message named other values."""
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import expand

    for _ in range(20):  # 1,2,1 shuffles to one of three orders; each must name 1
        with pytest.raises(TransferkitError, match=r"seed=shuffle\(1,2,1\) lists 1 twice\. Fix"):
            expand(["seed=shuffle(1,2,1)"])
    assert sorted(expand(["seed=shuffle(0,1,2)"])) == [["seed=0"], ["seed=1"], ["seed=2"]]


@pytest.mark.parametrize("stage, override, needle", [
    ("scratch", "transfer.epochs=2", "scratch does not read transfer.epochs: 'transfer.epochs=2' would change nothing "
                                     "but the params.yaml saved with its outputs. Fix: scratch.epochs=2, or both alike "
                                     "(transfer.epochs=2 scratch.epochs=2): it follows transfer.epochs where conf/ is "
                                     "composed, a params file holds its own value."),
    ("transfer", "distill.epochs=3", "transfer does not read distill.epochs: 'distill.epochs=3' would change nothing "
                                     "but the params.yaml saved with its outputs. Fix: set what transfer reads (seed, "
                                     "trainer, model, transfer)."),
])
def test_an_override_of_a_setting_the_stage_does_not_read_is_refused(tmp_path, stage, override, needle):
    """A params file holds values: scratch.epochs follows transfer.epochs only where conf/ is composed, so
    `transferkit scratch --params params.yaml transfer.epochs=2` trained scratch's epochs unchanged and saved a
    params.yaml saying transfer.epochs=2. (A sweep composes conf/, where scratch.epochs follows.)"""
    from transferkit.config.compose import compose, params_text
    from transferkit.sweep.points import check_read

    params = tmp_path / "params.yaml"
    params.write_text(params_text(compose(["experiment=smoke"])))
    proc = cli(stage, "--params", str(params), override, "--out", str(tmp_path / "out"))
    assert needle in one_error_line(proc) and not (tmp_path / "out").exists()
    # its own settings, how it runs, how collect scores it, and what its inputs were made with: no error
    # the experiment's name, which check_inputs compares with the name its inputs were made under, too
    # (a params file's run takes keys, not conf/'s groups: model.name=, not model=)
    check_read(stage, [f"{stage}.epochs=2", "seed=1", "trainer.progress_bar=false", "evaluate.tta=none",
                       "model.name=resnet18", "data.target.train_per_class=5", "name=mine"])


def test_a_sweep_value_a_setting_refuses_is_named_as_the_sweeps_to_change():
    """`transferkit sweep transfer transfer.lr=0.1,-1`: the fix is the sweep's value, not conf/ or `transferkit
    params`; a setting the point does not give keeps the general fix."""
    from transferkit.errors import TransferkitError
    from transferkit.config.overrides import swept_fix
    from transferkit.sweep.points import check_points

    with pytest.raises(TransferkitError, match=r"^sweep point \[experiment=smoke transfer.lr=-1\]: transfer.lr=-1 is "
                                               r"invalid: must be greater than 0\. Fix: change -1 among the sweep's "
                                               r"values of transfer.lr\.$"):
        check_points(None, ["experiment=smoke", "transfer.lr=0.1,-1"])
    message = "transfer.lr=-1 is invalid: must be greater than 0. Fix: set transfer.lr in conf/ or as an override."
    assert swept_fix(message, ["experiment=smoke", "seed=1"]) == message


def test_a_key_whose_name_only_begins_like_a_setting_the_stage_reads_is_not_read():
    """transfer reads transfer.* and seed, not +transfer_note or +seeds: a key is inside a setting only below a
    dot, so either would change nothing but the saved params.yaml."""
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import check_read

    for override, key in (("+transfer_note=x", "transfer_note"), ("+seeds=1", "seeds")):
        with pytest.raises(TransferkitError, match=rf"^transfer does not read {key}: '\{override}' would change"):
            check_read("transfer", [override])
    check_read("transfer", ["transfer.lr=0.1", "seed=1"])


def test_a_student_run_by_hand_takes_a_new_optimisation_given_for_both_it_and_distill():
    """The student baseline must train as distill does, and follows distill.* where conf/ is composed; a params file
    holds both values. Each refusal's fix leads to a command that runs: no override could change a params file's
    student.lr (student.lr alone trains unlike distill; distill.lr is not the student's setting), and distill, which
    does not read student.lr, takes it given alike with distill.lr, which it follows (walk J85)."""
    from transferkit.config.checks import validate
    from transferkit.config.compose import compose
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import check_read

    with pytest.raises(TransferkitError, match=r"trains unlike distill \(student.lr=0.1 vs distill.lr=1.0\).* Fix: "
                                               r"give both one value, `distill.lr=1.0 student.lr=1.0` or "
                                               r"`distill.lr=0.1 student.lr=0.1` \(where conf/ is composed, distill's "
                                               r"alone sets both"):
        validate(compose(["distill.lr=1.0", "student.lr=0.1"]))
    for stage in ("student", "distill"):
        check_read(stage, ["distill.lr=0.1", "student.lr=0.1"])
        check_read(stage, ["student.lr=0.1", "distill.lr=0.1"])
        check_read(stage, ["distill.lr=.1", "student.lr=0.1"])  # alike as Hydra reads them, written otherwise
        check_read(stage, ["distill.lr=1", "student.lr=1.0"])
    with pytest.raises(TransferkitError, match=r"Fix: student.lr=0.1, or both alike"):
        check_read("student", ["distill.lr=0.1", "student.lr=0.2"])
    for given in (["distill.lr=0.1", "student.lr=0.2"], ["student.lr=0.2"]):  # the student's own value: not distill's
        with pytest.raises(TransferkitError, match=r"^distill does not read student.lr: 'student.lr=0.2' would .* "
                                                   r"Fix: give distill.lr the same value \(distill.lr=0.2\), which "
                                                   r"student.lr follows in conf/, or leave student.lr out.$"):
            check_read("distill", given)
    with pytest.raises(TransferkitError, match=r"Fix: set what distill reads"):  # prune.lr follows no setting
        check_read("distill", ["prune.lr=0.1"])


@pytest.mark.parametrize("override", ["hydra/launcher=local_parallel", "+hydra.launcher.n_jobs=2"])
def test_sweep_refuses_hydra_settings_it_would_ignore(override, tmp_path):
    import re

    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import main

    with pytest.raises(TransferkitError, match=rf"override '{re.escape(override)}' cannot be used here.*-m"):
        main(["transfer", "transfer.freeze_depth=0,1", override, "--out", str(tmp_path)])  # not into the checkout


@pytest.mark.parametrize("overrides, needle", [
    (["transfer.freeze_depth=0,9"], "transfer.freeze_depth=9"),           # beyond the 4 blocks of fastnet_tiny
    (["transfer.freeze_depth=range(3,6)"], "transfer.freeze_depth=5"),
    (["transfer.freez_depth=0,1"], "freez_depth"),                         # unknown key
    # a key conf/ lacks: the keys it has that look like it, not "transfer does not read freeze_depth"
    (["freeze_depth=0,1"], "conf/ has no setting freeze_depth (did you mean freeze_curve.depths or "
                           "scratch.freeze_depth or transfer.freeze_depth?)"),
    (["transfer.freeze_depth=0,1", "transfer.lr=-1"], "transfer.lr"),
    # settings of the stages whose outputs the points read: every point would reuse the one result
    (["pretrain.epochs=1,2"], "pretrain.epochs=1 here, but "),
    (["data.target.train_per_class=5,10"], "data.target.train_per_class=5 here, but "),
    # a setting transfer does not read: both points would be one run, trained twice
    (["distill.temperature=2,4", "seed=0"], "transfer does not read distill.temperature: 'distill.temperature=2,4' "
                                            "would change nothing but the params.yaml saved with its outputs. Fix: "
                                            "set what transfer reads (seed, trainer, model, transfer)."),
    (["probe.depth=1", "seed=0,1"], "transfer does not read probe.depth: 'probe.depth=1'"),  # one value: it trained
    # a setting that says how a run shares the machine: read, but no point's name or score tells them apart
    (["trainer.num_threads=1,2", "seed=0"], "are one transfer run: a sweep names and scores its points without "
                                            "trainer.num_threads. Fix: set it once for the sweep, or run `transferkit "
                                            "transfer trainer.num_threads=VALUE` by hand once per value."),
    # a config group's options that differ in nothing transfer reads
    (["model@distill.student=fastnet_student,mobilenet"], "are one transfer run: transfer does not read "
     "model@distill.student. Fix: sweep settings transfer reads (seed, trainer, model, transfer, and those of the "
     "stages it reads)."),
    # no block has a learning rate: each depth is the linear probe again
    (["transfer.freeze_depth=0,1", "transfer.backbone_lr_mult=0"],
     "transfer.backbone_lr_mult=0 keeps every block frozen whatever transfer.freeze_depth, so the runs with depths "
     "[0, 1] would train one model"),
])
def test_bad_sweeps_fail_before_any_point_trains(base, tmp_path, overrides, needle):
    sweep = tmp_path / "sweep"
    proc = cli("transfer", "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
               f"hydra.sweep.dir={sweep}", *overrides)
    assert needle in one_error_line(proc)
    assert not sweep.exists()


@pytest.mark.parametrize("declared, needle", [
    ("pretrain.epochs: 1,2", "transfer.freeze_depth=0]: pretrain.epochs=1 here, but "),
    ("distill.temperature: 2,4", "transfer does not read distill.temperature: 'distill.temperature=2,4' would change")])
def test_a_sweep_conf_declares_is_checked_before_any_point_trains(base, tmp_path, declared, needle):
    """A sweep declared under hydra.sweeper.params (Hydra's other way, which the +hydra.sweeper.params refusal names)
    skipped every check: both points trained on the one pretrained backbone, or trained one run twice, under two
    names. The command line's value of a key it declares too decides it, as in Hydra's sweeper."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    with open(tmp_path / "conf" / "experiment" / "smoke.yaml", "a") as f:
        f.write(f"hydra:\n  sweeper:\n    params:\n      {declared}\n      transfer.freeze_depth: 0,1\n")
    sweep = tmp_path / "sweep"
    line = one_error_line(cli("transfer", "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
                              f"hydra.sweep.dir={sweep}", "transfer.freeze_depth=0", cwd=tmp_path))
    assert needle in line and "freeze_depth=1" not in line, line
    assert not sweep.exists()


def test_a_hydra_point_whose_folder_holds_other_files_is_told_hydras_folder_setting(base, tmp_path):
    """The Fix named --out, which a Hydra run does not take: its folders are hydra.run.dir and hydra.sweep.dir."""
    sweep = tmp_path / "sweep"
    (sweep / "transfer.freeze_depth=0" / "transfer").mkdir(parents=True)
    (sweep / "transfer.freeze_depth=0" / "transfer" / "notes.txt").write_text("mine")
    proc = cli("transfer", "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
               f"hydra.sweep.dir={sweep}", "transfer.freeze_depth=0,1")
    line = one_error_line(proc)
    assert "holds files no stage wrote" in line and line.endswith(
        "Fix: write them to a new or empty folder (hydra.run.dir=DIR, or hydra.sweep.dir=DIR with -m)."), line
    assert (sweep / "transfer.freeze_depth=0" / "transfer" / "notes.txt").read_text() == "mine"


def test_a_run_of_another_experiment_than_its_inputs_is_refused(base, tmp_path):
    proc = cli("transfer", f"paths.artifacts_dir={base / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert "made by experiment=smoke, this run composes experiment=cifar10_split" in one_error_line(proc)
    assert "Fix: add experiment=smoke" in proc.stderr and not (tmp_path / "run").exists()


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
    def make(sweep):
        _sweep(base, sweep, "transfer", "seed=0,1", "transfer.freeze_depth=0,1,2")
        _sweep(base, sweep, "scratch", "seed=0,1")
        _sweep(base, sweep, "probe", "seed=0")

    return made_once(tmp_path_factory, "collect", make)


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
def test_collect_names_the_hydra_jobs_it_leaves_out(collected_sweep, base, tmp_path):
    """A point that failed or was killed (no model.pt, or only a stage's hidden unfinished folder) was left out
    of the table with nothing said but a smaller seed count."""
    sweep = tmp_path / "sweep"
    shutil.copytree(collected_sweep, sweep)
    (sweep / "seed=1" / "scratch" / "model.pt").unlink()
    failed = sweep / "seed=0,transfer.freeze_depth=2"
    (failed / "transfer").rename(failed / ".transfer.incomplete")
    pretrained = sweep / "pretrain.lr=0.1"  # `transferkit pretrain -m` into the same folder: finished, not scored
    shutil.copytree(collected_sweep / "seed=1" / ".hydra", pretrained / ".hydra")
    (pretrained / "pretrain").mkdir()
    for name in ("params.yaml", "model.pt"):
        shutil.copy(collected_sweep / "seed=1" / "scratch" / name, pretrained / "pretrain" / name)
    proc = cli("collect", str(sweep), "--out", str(tmp_path / "out"), cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"transferkit collect: 2 of 9 Hydra jobs in {sweep} have no finished run (failed, killed or still "
            f"running) and are left out: seed=0,transfer.freeze_depth=2, seed=1") in proc.stderr, proc.stderr
    rows = {r["label"]: r for r in json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"]}
    assert rows["scratch"]["seeds"] == [0] and rows["transfer transfer.freeze_depth=2"]["seeds"] == [1]
    proc = cli("collect", str(collected_sweep), "--out", str(tmp_path / "all"), cwd=base)
    assert proc.returncode == 0 and "left out" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_collect_tells_settings_apart_and_refuses_other_experiments(collected_sweep, base, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(collected_sweep / "seed=0", mixed / "a")
    shutil.copytree(collected_sweep / "seed=1", mixed / "b")
    p = mixed / "b" / "scratch" / "params.yaml"
    params = yaml.safe_load(p.read_text())
    params["scratch"]["weight_decay"] = 0.001  # a setting that differs: its own row
    p.write_text(yaml.safe_dump(params))
    proc = cli("collect", str(mixed), "--out", str(tmp_path / "out"), cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("| scratch scratch.weight_decay=0.001" in proc.stdout
            and "| scratch scratch.weight_decay=0.0005" in proc.stdout)
    from transferkit.errors import TransferkitError
    from transferkit.sweep.collect import find_runs

    shutil.copytree(collected_sweep / "seed=0", tmp_path / "again")  # the same runs twice: not two seeds
    with pytest.raises(TransferkitError, match=r"are the same run \(\w+, seed 0.*unless each is given hydra.sweep.dir"):
        find_runs([mixed, tmp_path / "again"])  # two multiruns into one folder: Hydra's default for an experiment
    for twice in ([mixed, Path(f"{mixed}/")], [mixed, mixed / "seed=0"], [mixed / "seed=0", mixed]):  # one folder
        with pytest.raises(TransferkitError, match=r"are one folder, or one holds the other: .* Fix: give each"):
            find_runs(twice)
    params["data"]["target"]["classes"] = ["tgt_a", "tgt_b"]  # another task: another test set
    p.write_text(yaml.safe_dump(params))
    line = one_error_line(cli("collect", str(mixed), "--out", str(tmp_path / "out2"), cwd=base))
    assert "different experiments or data" in line  # named: the two runs and the first setting they differ in
    assert 'b/scratch data.target.classes=["tgt_a", "tgt_b"]. Fix: collect each' in line, line


@pytest.mark.slow
def test_transfer_from_another_pretraining_is_compared_with_the_one_scratch_baseline(collected_sweep, base, tmp_path,
                                                                                     monkeypatch):
    """scratch reads no pretrain.* setting: runs transferred from a shorter pretraining compare with the same
    scratch runs, which are not told apart by a setting that did not make them."""
    from transferkit.evaluation.runs import score, summarize
    from transferkit.sweep.collect import find_runs

    shutil.copytree(collected_sweep, tmp_path / "runs")
    for params_file in (tmp_path / "runs").rglob("transfer/params.yaml"):
        params = yaml.safe_load(params_file.read_text())
        params["pretrain"]["epochs"] += 1
        params_file.write_text(yaml.safe_dump(params))
    runs = find_runs([tmp_path / "runs"])
    assert {r.setting for r in runs if r.stage == "scratch"} == {()}
    assert all(any(o.startswith("pretrain.epochs=") for o in r.setting) for r in runs if r.stage == "transfer")
    monkeypatch.chdir(base)  # the runs' artifacts_dir (the test set) is relative to the project
    score(runs)
    rows = [r for r in summarize(runs)["rows"] if r["stage"] == "transfer"]
    assert rows and all(r["vs_scratch"]["difference"] is not None for r in rows)


@pytest.mark.parametrize("name, text", [("params.yaml", "seed: [0\n"), ("metrics.json", '{"val_acc": 0.5'),
                                        ("params.yaml", "just text\n"),
                                        ("timing.json", "[" * 100_000 + "]" * 100_000)])  # RecursionError
def test_collect_names_a_damaged_run_file(tmp_path, name, text):
    from transferkit.errors import TransferkitError
    from transferkit.sweep.collect import find_runs

    run = tmp_path / "sweep" / "seed=0" / "transfer"
    run.mkdir(parents=True)
    (run / "model.pt").touch()
    (run / "params.yaml").write_text("seed: 0\nname: smoke\n")
    (run / name).write_text(text)
    with pytest.raises(TransferkitError, match=rf"{run} holds a damaged params.yaml, metrics.json or timing.json "
                                               rf"\(.*\)\. Fix: rerun it, or move it out of the sweep folder"):
        find_runs([tmp_path / "sweep"])


@pytest.mark.parametrize("file, edit, reason", [
    ("params.yaml", lambda p: p["paths"].pop("artifacts_dir"), "its paths.artifacts_dir is no folder name"),
    ("params.yaml", lambda p: p.update(seed="one"), "seed 'one' is no whole number"),
    ("params.yaml", lambda p: p.update(trainer=["cpu"]), "its trainer block is no mapping"),
    ("metrics.json", lambda m: m.update(val_acc="0.5"), "its val_acc is no number"),
    ("timing.json", lambda t: t.update(train_seconds=[1]), "its train_seconds is no number")])
def test_collect_names_a_run_file_that_parses_but_is_not_what_a_stage_writes(tmp_path, file, edit, reason):
    """Files that parse but hold another shape ended collect in a KeyError, TypeError, ValueError or AttributeError
    traceback when it scored or summarised the run."""
    from transferkit.config.compose import params_text
    from transferkit.errors import TransferkitError
    from transferkit.sweep.collect import find_runs

    run = tmp_path / "sweep" / "seed=0" / "transfer"
    run.mkdir(parents=True)
    (run / "model.pt").touch()
    files = {"params.yaml": yaml.safe_load(params_text(compose("experiment=smoke", tmp=tmp_path))),
             "metrics.json": {"val_acc": 0.5}, "timing.json": {"train_seconds": 1.0}}
    edit(files[file])
    (run / "params.yaml").write_text(yaml.safe_dump(files["params.yaml"]))
    for name in ("metrics.json", "timing.json"):
        (run / name).write_text(json.dumps(files[name]))
    with pytest.raises(TransferkitError, match=rf"{run} holds a damaged params.yaml, metrics.json or timing.json "
                                               rf"\({reason}\)\. Fix: rerun it"):
        find_runs([tmp_path / "sweep"])


def test_scoring_a_run_whose_params_name_no_artifacts_folder_is_one_error(tmp_path):
    """A params.yaml without its paths block: a KeyError traceback once collect scored the run."""
    from transferkit.errors import TransferkitError
    from transferkit.evaluation.runs import read_run, score

    (tmp_path / "params.yaml").write_text("seed: 0\nname: smoke\n")
    with pytest.raises(TransferkitError, match=rf"{tmp_path}'s params.yaml names no paths.artifacts_dir, where the "
                                               r"test set it is scored on lies. Fix: rerun it"):
        score([read_run(tmp_path, "transfer")])


def test_collect_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(cli("collect", str(tmp_path / "empty")))
    assert "no finished runs" in line


def test_collect_writes_nowhere_dvc_tracks(tmp_path, monkeypatch):
    """`collect multirun/x --out artifacts/evaluate` wrote sweep.md, .json, .png and scores.pt into evaluate's
    outputs (dvc status: changed outs), and `collect artifacts/transfer` into transfer's, by default."""
    from transferkit.errors import TransferkitError
    from transferkit.sweep.collect import main

    project = dvc_project(tmp_path / "project", {
        "transfer": {"cmd": "x", "outs": [{"artifacts/transfer": {"persist": True}}]},
        "evaluate": {"cmd": "y", "deps": ["artifacts/transfer"], "outs": ["artifacts/evaluate"]}})
    (project / "multirun").mkdir()
    monkeypatch.chdir(project)
    for argv, says in ((["multirun", "--out", "artifacts/evaluate"], "--out artifacts/evaluate is "),
                       (["artifacts/transfer"], r"--out \(by default DIR/collected\) artifacts/transfer/collected "
                                                "lies in "),
                       (["multirun", "--out", "conf"], "--out conf is in the project's conf/")):
        with pytest.raises(TransferkitError, match=f"^{says}.* Fix: --out a new folder of its own"):
            main(argv)
    assert not (project / "artifacts").exists() and not list(project.rglob("sweep.*"))


def test_a_folder_above_a_sweep_folder_is_refused_rather_than_collected_whole(tmp_path):
    """`collect sweeps` walked every model.pt below it: the points of an earlier sweep into sweeps/x, which
    its dvc.yaml no longer lists (and which DVC was never asked about), counted too."""
    from transferkit.errors import TransferkitError
    from transferkit.project import RUNS_HEADER
    from transferkit.sweep.collect import find_runs

    sweep = tmp_path / "sweeps" / "x-transfer"
    for point in ("seed=0", "seed=0,transfer.freeze_depth=2"):
        (sweep / point / "transfer").mkdir(parents=True)
        (sweep / point / "transfer" / "model.pt").touch()
        (sweep / point / "transfer" / "params.yaml").write_text(yaml.safe_dump({"name": "smoke", "seed": 0}))
    (sweep / "dvc.yaml").write_text(RUNS_HEADER + "stages:\n  point0:\n    cmd: x\n    outs:\n"
                                    "    - seed=0,transfer.freeze_depth=2/transfer\n")
    with pytest.raises(TransferkitError, match=rf"{tmp_path / 'sweeps'} holds the sweep folder {sweep}: collected "
                                               rf"from above, .* Fix: give the sweep folders themselves"):
        find_runs([tmp_path / "sweeps"])


@pytest.mark.parametrize("given", [".", "scenario_small_similar"])
def test_collect_reads_a_runs_folder_strategies_by_the_stage_that_made_them(tmp_path, monkeypatch, given):
    """A scenarios folder's runs are named after strategies (linear_probe, partial_freeze), not stages: collect
    on it, or on one quadrant, took only scratch, whose folder is a stage's name, and left the rest out unsaid."""
    from transferkit.project import RUNS_HEADER
    from transferkit.sweep import collect
    from transferkit.sweep.collect import find_runs

    monkeypatch.setattr(collect, "stale_stages", lambda folder: [])  # DVC's own check, tested with a real sweep
    folder, stages = tmp_path / "scenarios", {}
    for name, stage, setting in (("pretrain", "pretrain", {}), ("linear_probe", "probe", {"probe": {"depth": None}}),
                                 ("early_probe", "probe", {"probe": {"depth": 2}}),
                                 ("fine_tune", "transfer", {"transfer": {"freeze_depth": 0}}),
                                 ("partial_freeze", "transfer", {"transfer": {"freeze_depth": 2}}),
                                 ("scratch", "scratch", {})):
        run = folder / "scenario_small_similar" / name
        run.mkdir(parents=True)
        (run / "model.pt").touch()
        (run / "params.yaml").write_text(yaml.safe_dump({"name": "scenario_small_similar", "seed": 0, **setting}))
        stages[f"scenario_small_similar-{name}"] = {
            "cmd": f"transferkit {stage} --params params/scenario_small_similar.yaml --out {run.relative_to(folder)}",
            "outs": [str(run.relative_to(folder))]}
    (folder / "dvc.yaml").write_text(RUNS_HEADER + yaml.safe_dump({"stages": stages}))
    runs = find_runs([folder / given])
    assert sorted((r.folder.name, r.label) for r in runs) == [
        ("early_probe", "probe probe.depth=2"), ("fine_tune", "transfer transfer.freeze_depth=0"),
        ("linear_probe", "probe probe.depth=null"), ("partial_freeze", "transfer transfer.freeze_depth=2"),
        ("scratch", "scratch")]


def test_collect_of_a_folder_inside_a_sweep_folder_takes_only_the_points_in_it(tmp_path, monkeypatch):
    """`collect sweep/seed=1` reads what the sweep's dvc.yaml (in the folder above) lists, and keeps the points
    that lie in the folder given: the sweep's other points are not collected with it."""
    from transferkit.project import RUNS_HEADER
    from transferkit.sweep import collect
    from transferkit.sweep.collect import find_runs

    monkeypatch.setattr(collect, "stale_stages", lambda folder: [])  # DVC's own check, tested with a real sweep
    sweep, stages = tmp_path / "sweep", {}
    for seed in (0, 1):
        run = sweep / f"seed={seed}" / "transfer"
        run.mkdir(parents=True)
        (run / "model.pt").touch()
        (run / "params.yaml").write_text(yaml.safe_dump({"name": "smoke", "seed": seed}))
        stages[f"point{seed}"] = {"cmd": f"transferkit transfer --out seed={seed}/transfer",
                                  "outs": [f"seed={seed}/transfer"]}
    (sweep / "dvc.yaml").write_text(RUNS_HEADER + yaml.safe_dump({"stages": stages}))
    assert [r.seed for r in find_runs([sweep / "seed=1"])] == [1]
    assert sorted(r.seed for r in find_runs([sweep])) == [0, 1]


def _scorable(tmp_path):
    """A prepared task (with the params.yaml prepare saves beside it), a model trained for it, and `scored()`:
    the model scored by score() with tmp_path/scores.pt as the cache."""
    import torch

    from transferkit.data.synthetic import make_synthetic
    from transferkit.data.tasks import select_task
    from transferkit.evaluation.runs import Run, score
    from transferkit.io import save_torch
    from transferkit.models import build_model, save_checkpoint

    classes = ["a", "b", "c"]
    task = select_task(make_synthetic(classes, 8, 6, seed=0), classes, train_per_class=8, val_per_class=0,
                       test_per_class=None, seed=0, role="target")
    task_file = tmp_path / "artifacts" / "prepare" / "target.pt"
    save_torch(task, task_file)
    data = {"target": {"classes": classes, "train_per_class": 8}}
    (task_file.parent / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "data": data}))
    torch.manual_seed(0)
    save_checkpoint(build_model("fastnet", 3, widths=[8, 8, 8], stem_width=8).eval(), tmp_path / "run" / "model.pt",
                    classes, stage="transfer")
    params = {"seed": 1, "data": data, "paths": {"artifacts_dir": str(tmp_path / "artifacts")},
              "evaluate": {"tta": "none", "batch_size": 64}}  # another seed: a seed sweep reads one prepare

    def scored() -> torch.Tensor:
        run = Run("transfer", tmp_path / "run", params, None)
        score([run], cache_file=tmp_path / "scores.pt")
        return run.correct

    return task, task_file, params, scored


def test_collect_scores_where_evaluate_does(tmp_path, monkeypatch, caplog):
    """A run trained on the GPU is scored there, as evaluate scores it (eval_device): on the CPU, an image
    whose logits nearly tie could count otherwise, and collect would report another top-1."""
    from transferkit.evaluation import runs

    _, _, params, scored = _scorable(tmp_path)
    devices = []
    real = runs.predict
    monkeypatch.setattr(runs, "predict", lambda *a, device="cpu", **k: devices.append(device) or real(*a, **k))
    scored()
    params["trainer"] = {"accelerator": "gpu"}  # the cached CPU score is not this run's
    monkeypatch.setattr(runs.torch.cuda, "is_available", lambda: True)
    scored()
    assert devices == ["cpu", "cuda"]
    # collected where there is no GPU: scored on the CPU, with a warning, not a traceback from torch
    monkeypatch.setattr(runs.torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="transferkit.evaluation.runs"):
        scored()
    assert devices == ["cpu", "cuda"] and "trained on a GPU and this machine has none" in caplog.text  # the CPU's,
    # cached above


def test_score_cache_is_renewed_when_the_task_is_prepared_again(tmp_path):
    import os

    from transferkit.io import save_torch

    task, task_file, _, scored = _scorable(tmp_path)
    first = scored()
    task["test_y"] = (task["test_y"] + 1) % 3  # prepare ran again and the test labels moved
    save_torch(task, task_file)
    os.utime(task_file, ns=(task_file.stat().st_atime_ns, task_file.stat().st_mtime_ns + 10**9))
    second = scored()
    assert first.any() and not (first & second).any()  # scored again: every image right before is wrong now


def test_score_cache_is_renewed_when_the_scoring_code_changes(tmp_path, monkeypatch):
    """An edit to predict or a model (which reruns evaluate) scores the runs of a multirun again too."""
    from transferkit.evaluation import runs

    _, _, _, scored = _scorable(tmp_path)
    calls, real = [], runs.predict
    monkeypatch.setattr(runs, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    scored()
    scored()
    assert len(calls) == 1  # the second from the cache
    code = runs.scoring_code()
    monkeypatch.setattr(runs, "scoring_code", lambda: code + "-edited")
    scored()
    assert len(calls) == 2


def test_scores_on_a_given_test_set_are_cached_by_its_content(tmp_path, monkeypatch):
    """The scenarios' report scores each quadrant's strategies on the task it gives (a rerun scored every model
    again, a minute with nothing printed): cached, and scored again where the test set given differs."""
    from transferkit.evaluation import runs

    task, _, params, _ = _scorable(tmp_path)
    calls, real = [], runs.predict
    monkeypatch.setattr(runs, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))

    def scored(given):
        run = runs.Run("transfer", tmp_path / "run", params, None)
        runs.score([run], given, cache_file=tmp_path / "scores.pt")
        return run.correct

    first = scored(task)
    assert scored(task).equal(first) and len(calls) == 1  # the second from the cache
    moved = {**task, "test_y": (task["test_y"] + 1) % 3}
    assert not (scored(moved) & first).any() and len(calls) == 2  # another test set: scored on it


def test_a_damaged_score_cache_is_rebuilt(tmp_path, caplog):
    from transferkit.errors import TransferkitError
    from transferkit.io import load_plain

    _, _, _, scored = _scorable(tmp_path)
    first, cache = scored(), tmp_path / "scores.pt"
    whole = cache.read_bytes()
    for damaged in (whole[:300], b"not a zip"):  # truncated, garbage
        cache.write_bytes(damaged)
        caplog.clear()
        assert scored().equal(first)
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert f"{cache} is unreadable" in caplog.text and "rebuild it" in caplog.text
        assert load_plain(cache, "")  # written again whole
    cache.write_bytes(b"\x80\x02c__builtin__\neval\n.")  # code: refused, as test_safe_files checks in full
    with pytest.raises(TransferkitError, match="not plain data"):
        scored()
    cache.write_bytes(whole)
    caplog.clear()
    assert scored().equal(first) and not caplog.records


def test_runs_are_scored_only_on_the_task_they_were_trained_for(tmp_path, monkeypatch):
    """The test set at paths.artifacts_dir (relative: from the current folder) must be the one the run's
    data block prepared; a missing one names the path it looked at."""
    from transferkit.errors import TransferkitError

    _, task_file, params, scored = _scorable(tmp_path)
    saved = yaml.safe_load((task_file.parent / "params.yaml").read_text())
    saved["data"]["target"]["train_per_class"] = 4  # prepare ran again with other settings
    (task_file.parent / "params.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(TransferkitError, match=r"trained with data.target.train_per_class=8, but the target test set "
                                               r"at .*target.pt was prepared with data.target.train_per_class=4 .*"
                                               r"Fix: run collect from the project folder that made the runs"):
        scored()
    params["paths"]["artifacts_dir"] = "artifacts"
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(TransferkitError, match=r"at artifacts/prepare/target.pt, which does not exist \(a relative "
                                               r"paths.artifacts_dir resolves from the current folder, .*/run\)"):
        scored()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferkitError, match="prepared with data.target.train_per_class=4"):
        scored()
    from transferkit.sweep.collect import collect  # refused so, collect leaves no collected/ of its own behind

    (tmp_path / "sweep" / "transfer").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "model.pt", tmp_path / "sweep" / "transfer")
    (tmp_path / "sweep" / "transfer" / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(TransferkitError, match="prepared with data.target.train_per_class=4"):
        collect([tmp_path / "sweep"], tmp_path / "sweep" / "collected" / "new")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["transfer"]
    saved["data"]["target"]["train_per_class"] = 8
    (task_file.parent / "params.yaml").write_text(yaml.safe_dump(saved))
    assert scored().any()


def test_runs_scored_on_different_test_images_are_not_compared_image_by_image(tmp_path):
    """Two projects whose prepare made other test images under the same settings (another dataset file at the
    same path): a transfer run of one and a scratch run of the other were paired by image, as if one test set."""
    import os
    import shutil

    import torch

    from transferkit.errors import TransferkitError
    from transferkit.evaluation.runs import Run, score, summarize
    from transferkit.io import save_torch
    from transferkit.models import build_model, save_checkpoint

    task, task_file, params, _ = _scorable(tmp_path / "a")
    other = tmp_path / "b"
    shutil.copytree(tmp_path / "a", other)
    torch.manual_seed(1)
    save_checkpoint(build_model("fastnet", 3, widths=[8, 8, 8], stem_width=8).eval(), other / "run" / "model.pt",
                    task["classes"], stage="scratch")
    save_torch({**task, "test_x": task["test_x"].flip(-1)}, other / "artifacts" / "prepare" / "target.pt")

    def runs() -> list:
        made = [Run("transfer", tmp_path / "a" / "run", params, 0.5),
                Run("scratch", other / "run", {**params, "paths": {"artifacts_dir": str(other / "artifacts")}}, 0.5)]
        score(made, cache_file=tmp_path / "scores.pt")
        return made

    with pytest.raises(TransferkitError, match=rf"^{tmp_path / 'a' / 'run'} and {other / 'run'} were scored on "
                                               r"different test images .* Fix: collect runs of one project's"):
        summarize(runs())
    with pytest.raises(TransferkitError, match="were scored on different test images"):
        summarize(runs())  # from the cache too
    save_torch(task, other / "artifacts" / "prepare" / "target.pt")  # the same images: compared image by image
    stamp = (other / "artifacts" / "prepare" / "target.pt").stat()
    os.utime(other / "artifacts" / "prepare" / "target.pt", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    row = next(r for r in summarize(runs())["rows"] if r["stage"] == "transfer")
    assert row["vs_scratch"]["pairs"] == 1 and row["vs_scratch"]["method"].startswith("paired by image")


def test_inputs_made_with_other_settings_are_named_with_the_fix(tmp_path, monkeypatch):
    """check_inputs on its own: a differing setting (run with the input's value, or vary it with a
    DVC experiment that keeps the project's overrides), a key the input was made without (make it
    again), and an unreadable params file, YAML or text (left to the stage)."""
    from transferkit.config.compose import params_text, to_params
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import check_inputs

    shutil.copytree(ROOT / "conf", tmp_path / "conf")  # a project whose params.yaml is the smoke experiment
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke"), ["experiment=smoke"]))
    monkeypatch.chdir(tmp_path)

    cfg = compose("experiment=smoke", tmp=tmp_path)
    saved = to_params(cfg)
    saved["data"]["target"]["train_per_class"] += 1
    check_inputs("pretrain", cfg)  # no input yet: left to the stage (a Hydra run's --help and --cfg need none)
    (tmp_path / "artifacts" / "prepare").mkdir(parents=True)
    params = tmp_path / "artifacts" / "prepare" / "params.yaml"
    params.write_text(yaml.safe_dump(saved))
    n = saved["data"]["target"]["train_per_class"]
    with pytest.raises(TransferkitError, match=rf"Fix: run with data.target.train_per_class={n};.*`dvc exp run "
                                               rf"--queue -S experiment=smoke -S data.target.train_per_class=\.\.\.`"):
        check_inputs("pretrain", cfg)
    with pytest.raises(TransferkitError, match=r"Fix: run with data.target.train_per_class="):  # a block given
        check_inputs("pretrain", cfg, given={"seed", "data"})
    saved["data"]["target"]["classes"] = ["tgt_b", "tgt_a", "tgt_c"]  # two settings apart: both in one fix
    params.write_text(yaml.safe_dump(saved))
    with pytest.raises(TransferkitError, match=rf" \(and other values of data.target.train_per_class\), and "
                                               rf"pretrain reads it\. Fix: run with "
                                               rf'data.target.classes=\["tgt_b","tgt_a","tgt_c"\] '
                                               rf"data.target.train_per_class={n}; to vary"):
        check_inputs("pretrain", cfg)
    with pytest.raises(TransferkitError, match=r"Fix: make it again with this code and config"):  # params.yaml's
        check_inputs("pretrain", cfg, given={"seed"})
    saved["data"]["target"]["classes"] = ["tgt_a", "tgt_b", "tgt_c"]
    params.write_text(yaml.safe_dump(saved))
    with pytest.raises(TransferkitError, match=r"Fix: run with data.target.train_per_class="):  # a group's package
        check_inputs("pretrain", cfg, given={"seed", "dataset@data.target"})
    # the value is params.yaml's, not the sweep's: the input is older than params.yaml
    with pytest.raises(TransferkitError, match=r"Fix: make it again with this code and config \(`dvc repro prepare`\)"):
        check_inputs("pretrain", cfg, given={"seed"})
    saved["data"]["target"].pop("train_per_class")
    params.write_text(yaml.safe_dump(saved))
    with pytest.raises(TransferkitError, match=r"Fix: make it again with this code and config \(`dvc repro prepare`\)"):
        check_inputs("pretrain", cfg)
    params.write_text("data: [unclosed")
    check_inputs("pretrain", cfg)
    params.write_bytes(b"name: \xff\xfe\n")  # no UTF-8 text: left to the stage too, not a traceback
    check_inputs("pretrain", cfg)
    saved["seed"], saved["trainer"]["precision"] = 7, "32-true"  # how a run is made, not what it reads
    saved["data"]["target"]["train_per_class"] = n - 1
    params.write_text(yaml.safe_dump(saved))
    check_inputs("pretrain", cfg)
    # a backbone of another model: its keys differ, and a key of its that this model lacks is no code change
    (tmp_path / "artifacts" / "pretrain").mkdir()
    saved["model"] = {**saved["model"], "name": "vgg_mini", "a_key_of_vgg_mini": 1}
    (tmp_path / "artifacts" / "pretrain" / "params.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(TransferkitError, match=r'model.name="\w+" here, but .* Fix: run with model.name="vgg_mini"'):
        check_inputs("transfer", cfg)
    # another experiment's input: a sweep or a Hydra run adds experiment=, a --params run (which refuses
    # experiment=) takes another params file or another folder
    saved["name"] = "default"
    (tmp_path / "artifacts" / "pretrain" / "params.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(TransferkitError, match=r"was made by experiment=default, this run composes experiment=smoke, "
                                               r"and transfer reads it\. Fix: add experiment=default \(and no "
                                               r"name=, which it sets\)\.$"):
        check_inputs("transfer", cfg)
    with pytest.raises(TransferkitError, match=r"Fix: run with a params file of experiment=default \(`transferkit "
                                               r"params experiment=default` writes one\), or give --in pretrain=DIR, "
                                               r"a folder p.yaml made\.$"):
        check_inputs("transfer", cfg, {"seed"}, {}, Path("p.yaml"))


def test_an_input_made_without_a_setting_this_run_sets_to_null_is_named_to_be_made_again(tmp_path, monkeypatch):
    """A key the input's saved params lack (code older than the setting made it) is no match for the key set to
    null here: the input is named to be made again, not read as if it were made with null."""
    from transferkit.config.compose import params_text, to_params
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import check_inputs

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke"), ["experiment=smoke"]))
    monkeypatch.chdir(tmp_path)
    cfg = compose("experiment=smoke", tmp=tmp_path)
    saved = to_params(cfg)
    assert saved["data"]["target"]["test_per_class"] is None
    (folder := tmp_path / "artifacts" / "prepare").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(saved))
    check_inputs("pretrain", cfg)  # made with these settings
    saved["data"]["target"].pop("test_per_class")
    (folder / "params.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(TransferkitError, match=rf'^data.target.test_per_class=null here, but {folder} was made with '
                                               rf'no data.target.test_per_class, and pretrain reads it\. '
                                               rf"Fix: make it again with this code and config \(`dvc repro "
                                               rf"prepare`\)\.$"):
        check_inputs("pretrain", cfg)


def test_an_input_made_by_dvc_repro_with_other_code_is_named_with_the_fix(tmp_path, monkeypatch):
    """Its settings match, but a source file of its stage has changed since `dvc repro` made it (dvc.lock records
    another md5): every point of a sweep trained on it, an output of the code before the edit."""
    import hashlib

    from transferkit.config.compose import params_text, to_params
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import check_inputs

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke"), ["experiment=smoke"]))
    monkeypatch.chdir(tmp_path)
    cfg = compose("experiment=smoke", tmp=tmp_path)
    (folder := tmp_path / "artifacts" / "prepare").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(to_params(cfg)))
    code = tmp_path / "src" / "transferkit" / "stages" / "prepare.py"
    code.parent.mkdir(parents=True)
    code.write_text("ran = 1\n")

    def lock(out: str) -> None:
        made_by = hashlib.md5(b"ran = 1\n").hexdigest()
        deps = [{"path": "data", "hash": "md5", "md5": "0" * 32 + ".dir"},
                {"path": "src/transferkit/stages/prepare.py", "hash": "md5", "md5": made_by}]
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {
            "cmd": "transferkit prepare --params params.yaml", "deps": deps, "outs": [{"path": out}]}}}))

    lock("artifacts/prepare")
    check_inputs("pretrain", cfg)  # made with the code there is
    code.write_text("ran = 2\n")
    with pytest.raises(TransferkitError, match=rf"^{folder} was made with other code: "
                                               rf"src/transferkit/stages/prepare.py changed since `dvc repro` made it "
                                               rf"\(dvc\.lock says so\), and pretrain reads it\. Fix: make it again "
                                               rf"with this code \(`dvc repro prepare`\), or, where the change "
                                               rf"cannot alter it, record that it stands \(`dvc commit -f "
                                               rf"prepare`\)\.$"):
        check_inputs("pretrain", cfg)
    code.unlink()  # a file deleted since is changed too
    with pytest.raises(TransferkitError, match="was made with other code"):
        check_inputs("pretrain", cfg)
    lock("other/prepare")  # dvc.lock says how another folder was made: its saved params.yaml is all there is
    check_inputs("pretrain", cfg)
    (tmp_path / "dvc.lock").write_text("stages: [unclosed")  # a damaged lock: left to DVC to report
    check_inputs("pretrain", cfg)


def _run(stage: str, seed: int, accuracy: float, n: int = 5000):
    """A scored run whose first `accuracy * n` of `n` test images (shuffled by seed) are right."""
    import torch

    from transferkit.evaluation.runs import Run

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10 + len(stage)))
    correct = torch.zeros(n, dtype=torch.bool)
    correct[order[:round(accuracy * n)]] = True
    return Run(stage, ROOT / stage / str(seed), {"seed": seed}, 0.5, test_acc=float(correct.float().mean()),
               correct=correct)


def test_the_stage_swept_is_the_main_one_when_its_teacher_is_collected_with_it():
    """A distill sweep's folder holds the transfer run that taught it: the best on val is chosen among the distill
    settings (the single transfer row was marked best, chosen from one), and transfer wins only a tie."""
    from dataclasses import replace

    from transferkit.evaluation.runs import summarize

    distill = [replace(_run("distill", seed, 0.7), setting=(f"distill.temperature={t}",), val_acc=v)
               for seed in (0, 1) for t, v in ((2, 0.6), (4, 0.65))]
    table = summarize([_run("transfer", 0, 0.8), _run("transfer", 1, 0.8), *distill])
    assert table["stage"] == "distill"
    assert [r["label"] for r in table["rows"] if r["chosen_on_val"]] == ["distill distill.temperature=4"]
    assert summarize([_run("transfer", 0, 0.8), _run("distill", 0, 0.7)])["stage"] == "transfer"


def test_a_probe_collected_with_scratch_alone_is_the_main_stage():
    """Probe and scratch runs, and nothing else: the best on val is chosen among the probes, each compared with
    scratch (scratch, first in row order, was the main stage, its rows marked best and compared with nothing)."""
    from transferkit.evaluation.runs import summarize

    table = summarize([_run("probe", 0, 0.6), _run("probe", 1, 0.62), _run("scratch", 0, 0.7), _run("scratch", 1, 0.7)])
    assert table["stage"] == "probe"
    assert [r["stage"] for r in table["rows"] if r["chosen_on_val"]] == ["probe"]
    assert next(r for r in table["rows"] if r["stage"] == "probe")["vs_scratch"]["pairs"] == 2


def test_versus_scratch_pairs_only_the_seeds_both_ran():
    """Transfer over seeds 0, 1, 2 against scratch run once with seed 0: seed 0's runs, paired by image,
    not the three seeds' mean against it with an interval that leaves out the spread across seeds."""
    import torch

    from transferkit.evaluation.metrics import mean_difference, paired_difference
    from transferkit.evaluation.runs import summarize, versus
    from transferkit.evaluation.tables import sweep_table

    transfer = [_run("transfer", 0, 0.74), _run("transfer", 1, 0.78), _run("transfer", 2, 0.80)]
    scratch = [_run("scratch", 0, 0.74)]
    vs = versus(transfer, scratch)
    alone = paired_difference(transfer[0].correct, scratch[0].correct)
    assert vs["difference"] == pytest.approx(0.0) and vs["ci95"] == pytest.approx(alone["ci95"])
    assert vs["pairs"] == 1 and vs["method"] == "paired by image on the one seed both ran (test-set noise only)"
    assert vs["ci95"][0] < 0 < vs["ci95"][1]
    table = sweep_table(summarize(transfer + scratch))
    # the mean columns are over seeds 0-2: the difference says it pairs seed 0 alone
    assert "best on val | 3 |" in table
    assert "| +0.0 (-1.7 to +1.7), seed 0 alone | not shown (interval includes 0) |" in table  # not "on one seed"

    # no seed in common: no difference and no interval, and the table says why
    vs = versus(transfer[1:], scratch)
    assert vs == {"difference": None, "ci95": None, "pairs": 0, "seeds": [], "baseline_seeds": [0],
                  "method": "none where no seed pairs with the baseline's"}
    table = sweep_table(summarize(transfer[1:] + scratch))
    assert "| no paired seed | – |" in table and "Intervals: none where no seed pairs" in table

    # two or more paired seeds: the t interval over seeds and the per-image one in quadrature; one seed, per image
    scratch += [_run("scratch", 1, 0.75)]
    vs = versus(transfer, scratch)
    seeds = mean_difference([t.test_acc - s.test_acc for t, s in zip(transfer, scratch)])
    images = paired_difference(torch.stack([t.correct for t in transfer[:2]]).float().mean(0),
                               torch.stack([s.correct for s in scratch]).float().mean(0))
    half = ((seeds["ci95"][1] - seeds["difference"]) ** 2 + (images["ci95"][1] - images["difference"]) ** 2) ** 0.5
    assert vs["pairs"] == 2 and vs["difference"] == pytest.approx(0.015, abs=1e-6)  # (74 - 74 + 78 - 75) / 2 points
    assert vs["ci95"] == pytest.approx([0.015 - half, 0.015 + half])
    assert half > seeds["ci95"][1] - seeds["difference"]
    assert versus(transfer[:1], scratch[:1])["ci95"] == pytest.approx(alone["ci95"])
    assert versus(transfer, []) is None


def test_a_row_that_pairs_some_seeds_or_ran_other_seeds_says_so():
    """A row's difference over the seeds it shares with scratch sat beside means over all of each side's seeds
    (a +4.9 by eye, -2.1 in the column), and best on val compared means over different seeds; a difference under
    0.05 points printed as +0.0 beside an interval that excludes 0."""
    from transferkit.evaluation.runs import summarize
    from transferkit.evaluation.tables import sweep_table

    def at(stage, seed, acc, depth):
        run = _run(stage, seed, acc)
        run.setting = (f"transfer.freeze_depth={depth}",) if stage == "transfer" else ()
        return run

    runs = [at("transfer", 0, 0.80, 0), at("transfer", 1, 0.82, 0), at("transfer", 0, 0.90, 1),
            *(at("scratch", seed, 0.70, None) for seed in (0, 1, 2))]
    table = sweep_table(summarize(runs))
    assert "), seeds 0, 1 alone |" in table and "), seed 0 alone |" in table
    assert "Best on val compares means over different seeds" in table
    even = [at("transfer", seed, 0.80, 0) for seed in (0, 1)] + [at("scratch", seed, 0.70, None) for seed in (0, 1)]
    assert " alone |" not in sweep_table(summarize(even)) and "different seeds" not in sweep_table(summarize(even))
    from transferkit.evaluation.formats import points

    assert points(0.0004) == "+0.04" and points(-0.0001) == "-0.01" and points(0.0) == "+0.0"


def test_an_interval_that_reaches_0_does_not_show_a_row_beats_scratch():
    """"yes" and "no: worse" need an interval that excludes 0: one whose bound is 0 is "not shown"."""
    from transferkit.evaluation.runs import summarize
    from transferkit.evaluation.tables import sweep_table

    runs = [_run(stage, seed, 0.7) for stage in ("transfer", "scratch") for seed in (0, 1)]
    for bounds, verdict in (([0.0, 0.02], "not shown (interval includes 0)"), ([0.001, 0.02], "yes"),
                            ([-0.02, 0.0], "not shown (interval includes 0)"), ([-0.02, -0.001], "no: worse")):
        summary = summarize(runs)
        next(r for r in summary["rows"] if r["stage"] == "transfer")["vs_scratch"]["ci95"] = bounds
        row = next(x for x in sweep_table(summary).splitlines() if x.startswith("| transfer"))
        assert row.endswith(f" | {verdict} |"), (bounds, row)


def test_seeds_that_agree_leave_the_test_sets_noise_in_the_interval():
    """Two seeds each 2 points apart on 100 test images: the spread across seeds is zero, but the 100
    images are one sample, so the interval keeps their noise (about +-2.8 points per seed pair) and
    includes 0; a t interval over seeds alone would be +2.0 to +2.0 and call it significant."""
    from transferkit.evaluation.runs import summarize
    from transferkit.evaluation.tables import sweep_table

    runs = [_run("transfer", 0, 0.62, 100), _run("transfer", 1, 0.63, 100),
            _run("scratch", 0, 0.60, 100), _run("scratch", 1, 0.61, 100)]
    row = next(r for r in summarize(runs)["rows"] if r["stage"] == "transfer")
    lo, hi = row["vs_scratch"]["ci95"]
    assert row["vs_scratch"]["difference"] == pytest.approx(0.02) and lo < 0 < hi and hi - lo > 0.04
    assert "not shown (interval includes 0)" in sweep_table(summarize(runs))


def test_a_sweep_over_a_setting_scratch_reads_compares_each_row_with_its_own_scratch():
    """model.widths swept for transfer and scratch: each transfer row against the scratch runs of its own
    widths, not against no scratch run at all (no scratch run has an empty setting)."""
    from transferkit.evaluation.runs import summarize

    runs = []
    for widths, (t, s) in (("[8, 16]", (0.70, 0.60)), ("[16, 32]", (0.80, 0.79))):
        for seed in (0, 1):
            for stage, acc in (("transfer", t + seed / 100), ("scratch", s)):
                run = _run(stage, seed, acc)
                run.setting = (f"model.widths={widths}",)
                runs.append(run)
    rows = {r["setting"][0]: r for r in summarize(runs)["rows"] if r["stage"] == "transfer"}
    assert rows["model.widths=[8, 16]"]["vs_scratch"]["difference"] == pytest.approx(0.105)
    assert rows["model.widths=[16, 32]"]["vs_scratch"]["difference"] == pytest.approx(0.015)


def test_a_student_sweep_over_its_network_is_told_apart(tmp_path):
    """distill.student.* is the student stage's own setting (its params in the stage table), though
    its block is distill's; a transfer run beside it keeps none of it."""
    from transferkit.sweep.collect import find_runs

    for name, stage, widths, lr in (("micro", "student", [4, 8], 0.1), ("tiny", "student", [8, 8], 0.1),
                                    ("lr1", "transfer", [8, 8], 0.1), ("lr2", "transfer", [8, 8], 0.2)):
        (tmp_path / name / stage).mkdir(parents=True)
        (tmp_path / name / stage / "model.pt").touch()
        (tmp_path / name / stage / "params.yaml").write_text(yaml.safe_dump(
            {"name": "smoke", "seed": 0, "data": {}, "distill": {"student": {"widths": widths}},
             "transfer": {"lr": lr}}))
    assert sorted(r.label for r in find_runs([tmp_path])) == [
        "student distill.student.widths=[4, 8]", "student distill.student.widths=[8, 8]",
        "transfer transfer.lr=0.1", "transfer transfer.lr=0.2"]


def test_seeds_run_with_other_thread_counts_are_one_row(tmp_path):
    """hydra/launcher=local_parallel asks for trainer.num_threads: a seed run without it is the same setting."""
    from transferkit.sweep.collect import find_runs

    for seed, threads, budget in ((0, None, 0.02), (1, 1, 0.02), (2, 1, 0.0)):
        (tmp_path / str(seed) / "transfer").mkdir(parents=True)
        (tmp_path / str(seed) / "transfer" / "model.pt").touch()
        (tmp_path / str(seed) / "transfer" / "params.yaml").write_text(yaml.safe_dump(
            {"name": "smoke", "seed": seed, "data": {}, "transfer": {"lr": 0.1},
             "trainer": {"num_threads": threads, "checkpoint_budget": budget}}))
    assert [r.label for r in find_runs([tmp_path])] == ["transfer"] * 3


def test_seeds_timed_with_other_evaluate_settings_are_one_row(tmp_path):
    """evaluate's timing settings (latency_repeats) change no score: a sweep's points do not rerun for them, so old
    and new points differ there, and are one row all the same; the settings a run is scored with set rows apart."""
    from transferkit.sweep.collect import find_runs

    for seed, repeats, tta in ((0, 300, "flip"), (1, 300, "flip"), (2, 100, "flip"), (3, 100, "none")):
        (tmp_path / str(seed) / "transfer").mkdir(parents=True)
        (tmp_path / str(seed) / "transfer" / "model.pt").touch()
        (tmp_path / str(seed) / "transfer" / "params.yaml").write_text(yaml.safe_dump(
            {"name": "smoke", "seed": seed, "data": {}, "transfer": {"lr": 0.1},
             "evaluate": {"latency_repeats": repeats, "tta": tta}}))
    assert [r.setting for r in find_runs([tmp_path])] == [("evaluate.tta=flip",)] * 3 + [("evaluate.tta=none",)]


def test_a_setting_written_as_an_int_by_one_sweep_and_a_float_by_another_is_one_row(tmp_path):
    """transfer.lr=1 and transfer.lr=1.0 compose alike: they were two rows, and the first had no scratch to be
    compared with (scratch's lr was 1.0)."""
    import torch

    from transferkit.evaluation.runs import summarize
    from transferkit.sweep.collect import find_runs

    for seed, stage, lr in ((0, "transfer", 1), (1, "transfer", 1.0), (2, "transfer", 0.5), (0, "scratch", 1.0),
                            (1, "scratch", 1)):
        (tmp_path / f"{stage}{seed}{lr}" / stage).mkdir(parents=True)
        (tmp_path / f"{stage}{seed}{lr}" / stage / "model.pt").touch()
        (tmp_path / f"{stage}{seed}{lr}" / stage / "params.yaml").write_text(yaml.safe_dump(
            {"name": "smoke", "seed": seed, "data": {}, "transfer": {"lr": lr, "widths": [8, 16.0]},
             "scratch": {"lr": lr}}))
    runs = find_runs([tmp_path])
    assert sorted({r.label for r in runs}) == ["scratch scratch.lr=1", "transfer transfer.lr=0.5",
                                               "transfer transfer.lr=1"]
    for r in runs:
        r.val_acc, r.test_acc, r.correct = 0.5, 0.5, torch.tensor([True, False] * 50)
    rows = {r["label"]: r for r in summarize(runs)["rows"]}
    assert rows["transfer transfer.lr=1"]["seeds"] == [0, 1]
    assert rows["transfer transfer.lr=1"]["vs_scratch"]["seeds"] == [0, 1]  # compared with scratch's two seeds


def test_a_difference_over_fewer_seeds_than_its_scratch_row_says_so(tmp_path):
    """The note was checked against the first scratch row (lr=0.5, seeds 0 and 1), not the one compared with
    (lr=1.0, seeds 0 to 2): a difference over seeds 0 and 1 alone read as one over the rows' means."""
    import torch

    from transferkit.evaluation.runs import summarize
    from transferkit.evaluation.tables import sweep_table
    from transferkit.sweep.collect import find_runs

    for seed, stage, lr in ((0, "scratch", 0.5), (1, "scratch", 0.5), (0, "scratch", 1.0), (1, "scratch", 1.0),
                            (2, "scratch", 1.0), (0, "transfer", 1.0), (1, "transfer", 1.0), (0, "transfer", 0.5)):
        folder = tmp_path / f"{stage}{seed}{lr}" / stage
        folder.mkdir(parents=True)
        (folder / "model.pt").touch()
        (folder / "params.yaml").write_text(yaml.safe_dump(
            {"name": "smoke", "seed": seed, "data": {}, "transfer": {"lr": lr}, "scratch": {"lr": lr}}))
    runs = find_runs([tmp_path])
    for i, r in enumerate(runs):
        r.val_acc = r.test_acc = 0.5
        r.correct = torch.arange(100) % (2 + i % 3) == 0
    table = sweep_table(summarize(runs))
    row = next(line for line in table.splitlines() if line.startswith("| transfer transfer.lr=1 "))
    assert ", seeds 0, 1 alone |" in row, table


def test_runs_trained_in_another_precision_are_another_row(tmp_path):
    """A sweep over trainer.precision is a sweep (check_points lets it run): collect tells its points apart
    rather than count them as two seeds of one run."""
    from transferkit.sweep.collect import find_runs

    for precision in ("32-true", "bf16-mixed"):
        (tmp_path / precision / "transfer").mkdir(parents=True)
        (tmp_path / precision / "transfer" / "model.pt").touch()
        (tmp_path / precision / "transfer" / "params.yaml").write_text(yaml.safe_dump(
            {"name": "smoke", "seed": 0, "data": {}, "transfer": {"lr": 0.1}, "trainer": {"precision": precision}}))
    assert sorted(r.label for r in find_runs([tmp_path])) == [
        "transfer trainer.precision=32-true", "transfer trainer.precision=bf16-mixed"]


def test_the_main_stage_of_a_tie_is_the_same_in_every_process():
    """Two stages with as many rows, no transfer: the first in the stage table's order (student before
    distill), whatever the process's hash seed."""
    import os
    import subprocess
    import sys

    code = ("from pathlib import Path\nfrom transferkit.evaluation.runs import Run, summarize\n"
            "print(summarize([Run(s, Path(s + v), {'seed': 0}, 0.5, setting=(f'{s}.x={v}',), test_acc=0.5) "
            "for s in ('distill', 'student') for v in '12'])['stage'])")
    mains = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                            capture_output=True, text=True, check=True).stdout.strip() for seed in ("0", "1")}
    assert mains == {"student"}


def test_one_seed_has_no_spread_and_intervals_stay_within_100_points():
    from transferkit.evaluation.runs import summarize
    from transferkit.evaluation.tables import sweep_table

    summary = summarize([_run("transfer", 0, 0.70), _run("scratch", 0, 0.60)])
    assert [(r["val_std"], r["test_std"]) for r in summary["rows"]] == [(None, None)] * 2
    assert "| scratch | 1 | 50.0 ± – | 60.0 ± – |" in sweep_table(summary)  # unknown, not 0.0
    # its interval is the test set's noise alone: the verdict says it rests on one seed
    row = next(x for x in sweep_table(summary).splitlines() if x.startswith("| transfer"))
    assert row.endswith(" | yes, on one seed |"), row
    # two seeds that disagree wildly: a t interval far wider than an accuracy difference can be
    table = sweep_table(summarize([_run("transfer", 0, 0.90), _run("transfer", 1, 0.30),
                                   _run("scratch", 0, 0.30), _run("scratch", 1, 0.40)]))
    assert "| +25.0 (-100.0 to +100.0) | not shown (interval includes 0) |" in table


def test_a_sweep_over_a_transfer_setting_scratch_follows_pairs_each_row_with_its_scratch():
    """transfer.epochs=1,2 and scratch with the same overrides: a transfer run records transfer.epochs, a scratch
    run scratch.epochs (which conf/ sets to ${transfer.epochs}); each row is still compared with its own."""
    from transferkit.evaluation.runs import summarize
    from transferkit.evaluation.tables import sweep_table

    runs = []
    for epochs, (t, s) in ((1, (0.70, 0.60)), (2, (0.80, 0.79))):
        for seed in (0, 1):
            for stage, acc in (("transfer", t + seed / 100), ("scratch", s)):
                run = _run(stage, seed, acc)
                run.params.update(transfer={"epochs": epochs}, scratch={"epochs": epochs})
                run.setting = (f"{stage}.epochs={epochs}",)
                runs.append(run)
    rows = {r["setting"][0]: r for r in summarize(runs)["rows"] if r["stage"] == "transfer"}
    assert rows["transfer.epochs=1"]["vs_scratch"]["difference"] == pytest.approx(0.105)
    assert rows["transfer.epochs=2"]["vs_scratch"]["difference"] == pytest.approx(0.015)
    # scratch run with other settings only: the row says so, not the "–" of a sweep without scratch
    table = sweep_table(summarize([r for r in runs if r.stage == "transfer" or "epochs=1" in r.setting[0]]))
    row = next(line for line in table.splitlines() if line.startswith("| transfer transfer.epochs=2"))
    assert row.endswith("| 80.5 ± 0.7 | no scratch run with its settings | – |")
    alone = sweep_table(summarize([r for r in runs if r.stage == "transfer"]))
    assert "| no scratch run with its settings |" not in alone


def test_a_sweep_without_val_splits_writes_plain_json_and_chooses_nothing(tmp_path):
    """Runs trained with val_per_class=0 have no val accuracy: sweep.json says null (NaN is not JSON),
    the table a dash, and no point is marked as chosen on val."""
    import torch

    from transferkit.evaluation.plots import sweep_png
    from transferkit.evaluation.runs import Run, summarize
    from transferkit.evaluation.tables import sweep_table

    runs = [Run(stage, tmp_path / f"{stage}{seed}", {"seed": seed}, None, test_acc=0.5 + seed / 10,
                correct=torch.tensor([True, bool(seed), False, True]))
            for stage in ("transfer", "scratch") for seed in (0, 1)]
    summary = summarize(runs)
    text = json.dumps(summary, default=str, allow_nan=False)  # raises on NaN
    assert '"val_mean": null' in text and not any(r["chosen_on_val"] for r in summary["rows"])
    assert "| – ± – | 55.0 ± 7.1 |" in sweep_table(summary)
    sweep_png(summary, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_glob_sweeps_a_config_groups_options_from_conf():
    """Hydra's glob() needs the config loader of a run, which a sweep's points are expanded without."""
    from transferkit.errors import TransferkitError
    from transferkit.sweep.points import expand

    points = expand(["model=glob(fastnet_*,exclude=fastnet_micro)", "transfer.lr=0.1,0.2"])
    assert points == [[f"model={m}", f"transfer.lr={lr}"]
                      for m in ("fastnet_airbench", "fastnet_student", "fastnet_tiny") for lr in ("0.1", "0.2")]
    with pytest.raises(TransferkitError, match=r"transfer.lr=glob\(\*\) chooses none of the options .*Fix: list"):
        expand(["transfer.lr=glob(*)"])


def test_the_sweep_table_says_when_scratch_is_missing_and_when_the_best_on_val_is_a_tie():
    """Every row showed "– | –" for scratch without a word why, and one of two rows tied on val was marked best
    as if it had won."""
    from transferkit.evaluation.runs import summarize
    from transferkit.evaluation.tables import sweep_table

    runs = [_run("transfer", seed, 0.7) for seed in (0, 1)]
    for r in runs:
        r.setting = ("transfer.freeze_depth=0",)
    tied = [_run("transfer", seed, 0.6) for seed in (0, 1)]  # the same val (_run's 0.5), worse on test
    for r in tied:
        r.setting, r.folder = ("transfer.freeze_depth=1",), r.folder.with_name(f"d1-{r.seed}")
    table = sweep_table(summarize(runs + tied))
    assert "No scratch runs among these: the scratch columns need a scratch sweep of the same seeds" in table
    assert "Best on val: tied with transfer transfer.freeze_depth=1 (ties go to the first row)." in table
    with_scratch = sweep_table(summarize(runs + [_run("scratch", seed, 0.6) for seed in (0, 1)]))
    assert "No scratch runs" not in with_scratch and "tied with" not in with_scratch


def test_a_transfer_seed_sweep_collected_with_its_probe_and_scratch_baselines_chooses_among_transfer():
    """The report's own `transferkit collect sweeps/x-transfer sweeps/x-scratch sweeps/x-probe`: one row each, the
    probe first in row order; probe is a baseline, so the main stage is transfer and its row is the one chosen."""
    from transferkit.evaluation.runs import summarize

    runs = [_run(stage, seed, acc) for stage, acc in (("transfer", 0.8), ("probe", 0.6), ("scratch", 0.7))
            for seed in (0, 1)]
    for r in runs:
        if r.stage == "probe":
            r.val_acc = 0.9  # better on val than transfer: still a baseline, not a candidate
    table = summarize(runs)
    assert table["stage"] == "transfer"
    assert [r["stage"] for r in table["rows"] if r["chosen_on_val"]] == ["transfer"]


def test_collect_scores_with_the_test_time_views_evaluate_tta_names(tmp_path, monkeypatch):
    """A run made with evaluate.tta=none is scored on one view, as evaluate scored it: collect's test top-1 is
    evaluate's, not the flip views' (and another tta is another score, not the cached one)."""
    from transferkit.evaluation import runs

    _, _, params, scored = _scorable(tmp_path)
    views = []
    real = runs.predict
    monkeypatch.setattr(runs, "predict",
                        lambda model, x, bs, tta, **k: views.append(tta) or real(model, x, bs, tta, **k))
    scored()
    params["evaluate"] = {**params["evaluate"], "tta": "flip"}
    scored()
    assert views == ["none", "flip"]


def test_numeric_settings_sort_as_numbers_and_a_tie_on_val_goes_to_the_first_of_them():
    """freeze_depth=10 after 2 (as text, "10" < "2"): the rows in numeric order, and of two depths tied on val
    the shallower one is chosen, as the table's note says (ties go to the first row)."""
    from transferkit.evaluation.runs import summarize

    runs = []
    for depth in (10, 2):
        for seed in (0, 1):
            r = _run("transfer", seed, 0.7)
            r.setting, r.folder = (f"transfer.freeze_depth={depth}",), r.folder.with_name(f"d{depth}-{seed}")
            runs.append(r)
    table = summarize(runs)
    assert [r["setting"] for r in table["rows"]] == [["transfer.freeze_depth=2"], ["transfer.freeze_depth=10"]]
    assert [r["label"] for r in table["rows"] if r["chosen_on_val"]] == ["transfer transfer.freeze_depth=2"]


def test_a_run_folder_named_name_dash_stage_is_read_as_that_stage(tmp_path):
    """Outside a sweep folder a run is named by its folder, STAGE or NAME-STAGE: lr1-transfer is a transfer run."""
    from transferkit.sweep.collect import find_runs

    for name, lr in (("lr1-transfer", 0.1), ("lr2-transfer", 0.2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").touch()
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump(
            {"name": "smoke", "seed": 0, "data": {}, "transfer": {"lr": lr}}))
    assert sorted(r.label for r in find_runs([tmp_path])) == ["transfer transfer.lr=0.1", "transfer transfer.lr=0.2"]


def test_runs_of_two_experiments_over_the_same_data_are_refused(tmp_path):
    """Two experiments (name=) may prepare the same data and still differ in what a table must not mix."""
    from transferkit.errors import TransferkitError
    from transferkit.sweep.collect import find_runs

    for name in ("smoke", "default"):
        (tmp_path / name / "transfer").mkdir(parents=True)
        (tmp_path / name / "transfer" / "model.pt").touch()
        (tmp_path / name / "transfer" / "params.yaml").write_text(yaml.safe_dump(
            {"name": name, "seed": 0, "data": {}, "transfer": {"lr": 0.1}}))
    with pytest.raises(TransferkitError, match="the runs come from different experiments or data.*name="):
        find_runs([tmp_path])
