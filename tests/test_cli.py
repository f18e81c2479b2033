"""The command line as users meet it: --help lists what there is, bad input ends in one
`error:` line that names the fix (exit code 2, no traceback), and nothing is overwritten."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli, compose, one_error_line, outside, run
from transferkit.config.compose import params_text


def test_help_lists_stages_experiments_and_overrides():
    out = cli("--help").stdout
    for word in ("prepare", "pretrain", "transfer", "probe", "scratch", "evaluate", "cifar10_split",
                 "seed_aquatic", "smoke", "transfer.freeze_depth", "trainer=ddp", "collect", "check-repro"):
        assert word in out
    models = " ".join(out.split("Models: model=")[1].split(";")[0].split()).split(" | ")  # over two lines
    assert sorted(models) == sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))  # every one conf/ has


def test_check_params_passes_on_the_committed_params():
    proc = cli("check-params")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", ["params", "check-params", "results", "collect", "sweep", "scenarios",
                                     "check-repro", "export", "predict"])
def test_every_command_has_help(command):
    before = (ROOT / "params.yaml").read_bytes()
    proc = cli(command, "--help")
    assert proc.returncode == 0 and f"transferkit {command}" in proc.stdout, proc.stdout + proc.stderr
    assert (ROOT / "params.yaml").read_bytes() == before  # asking for help writes nothing


def test_a_stage_run_by_hand_refuses_inputs_another_config_made(smoke_artifacts, tmp_path, monkeypatch, capsys):
    """`transferkit evaluate --params params.yaml` after `transferkit scratch --params params.yaml scratch.epochs=2`
    would set a 2-epoch scratch against the transfer run: refused, as a Hydra run and a sweep refuse it. Under
    `dvc repro` (DVC_STAGE set) DVC made every input from this params file."""
    import shutil

    import yaml

    from transferkit import cli as transferkit_cli
    from transferkit.stages import run as stages_run

    cfg, _ = smoke_artifacts
    shutil.copytree(cfg.paths.artifacts_dir, tmp_path / "artifacts")
    params = tmp_path / "params.yaml"
    params.write_text(params_text(compose("experiment=smoke", tmp=tmp_path)))
    made = yaml.safe_load((tmp_path / "artifacts" / "scratch" / "params.yaml").read_text())
    made["scratch"]["epochs"] += 1  # as `scratch.epochs=...` on scratch's command line made it
    (tmp_path / "artifacts" / "scratch" / "params.yaml").write_text(yaml.safe_dump(made))
    ran = []
    monkeypatch.setattr(stages_run, "run_stage", lambda *a, **k: ran.append(a[0]))
    line = _error(capsys, ["evaluate", "--params", str(params)])
    assert f"scratch.epochs={made['scratch']['epochs'] - 1} here, but" in line and "Fix:" in line and not ran
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    assert transferkit_cli.main(["evaluate", "--params", str(params)]) in (0, None) and ran == ["evaluate"]


@pytest.mark.parametrize("rank, command, module, ending", [
    ("0", "results", "transferkit.evaluation.tables", "."),
    ("1", "results", "transferkit.evaluation.tables", "."),
    ("0", "sweep", "transferkit.sweep.points", "; the same command again resumes."),  # DVC runs what is missing
])
def test_ctrl_c_outside_training_is_one_line_and_death_by_sigint(rank, command, module, ending):
    """Evaluate's scoring, say (a fit's Ctrl+C reaches here too: training/trainer.py): one line, not a traceback,
    and under DDP rank 0's alone. The command then dies of SIGINT, as Python does, so that a shell loop around
    it stops too."""
    import os
    import subprocess
    import sys

    code = (f"import {module} as tool\n"
            "def interrupted(argv): raise KeyboardInterrupt\n"
            "tool.main = interrupted\n"
            "from transferkit.cli import main\n"
            f"main(['{command}'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LOCAL_RANK": rank})
    assert proc.returncode == -2, proc.stderr
    assert proc.stderr.strip().splitlines() == (
        [f"transferkit {command}: interrupted; its earlier outputs, if any, are unchanged{ending}"]
        if rank == "0" else [])


@pytest.mark.parametrize("override, needle", [
    ("~data.target.val_per_class", "data.target.val_per_class is missing: the stages read it"),  # no "=" in it
    ("hydra/launcher=local_paralel", "hydra/launcher=local_paralel: conf/hydra/launcher/ has no such option"),
    ("hydra.job.chdirr=true", "conf/ has no setting hydra.job.chdirr"),
])
def test_a_sweeps_bad_hydra_setting_is_one_line(capsys, override, needle):
    """The launchers conf/hydra/launcher/ documents are picked on a stage's command line, as settings are deleted."""
    line = _error(capsys, ["transfer", "-m", override, "transfer.freeze_depth=0,1"])
    assert needle in line and "Fix:" in line, line


@pytest.mark.parametrize("argv, needle", [
    (["transfer", "transfer.freeze_depth"], "transfer.freeze_depth"),  # the `=` forgotten: Hydra's four lines
    (["transfer", "--cfg", "job", "transfer.lrr=1"], "has no setting transfer.lrr"),  # not Hydra's "use +key"
    (["transfer", "-c", "job", "-p", "transfer", "transfer.lrr=1"], "has no setting transfer.lrr"),
    (["transfer", "data.target.classes=[cät,dog]"], "quote a value with other characters (non-ASCII"),
    (["params", "data.target.classes=[cät,dog]"], "quote a value with other characters (non-ASCII")])
def test_hydra_runs_name_a_bad_override_in_one_line(capsys, argv, needle):
    assert needle in _error(capsys, argv)


@pytest.mark.parametrize("flag", ["--help", "--cfg=job"])
def test_a_stage_prints_help_and_its_config_where_a_run_of_it_would_be_refused(tmp_path, flag):
    """Outputs of another experiment under artifacts/ refuse a run (it would read them); asking how to
    run it, or what it would run with, is when a user needs an answer most."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "artifacts" / "prepare").mkdir(parents=True)
    (tmp_path / "artifacts" / "prepare" / "params.yaml").write_text(params_text(compose("experiment=smoke")))
    assert "was made by experiment=smoke" in cli("transfer", cwd=tmp_path).stderr  # the run: refused
    proc = cli("transfer", *flag.split("="), cwd=tmp_path)
    assert proc.returncode == 0 and ("Configuration groups" in proc.stdout if flag == "--help"
                                     else "freeze_depth:" in proc.stdout), proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_params_refuses_a_value_no_stage_could_run_with_and_keeps_its_files(tmp_path, monkeypatch, capsys):
    import shutil

    from transferkit import cli as transferkit_cli

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text(f"# the {name} of an earlier, valid composition\n")
    (tmp_path / "artifacts" / "student").mkdir(parents=True)
    (tmp_path / "artifacts" / "student" / "model.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for bad, needle in (("transfer.lr=-1", "transfer.lr=-1 is invalid"), ("transfer.freeze_depth=9", "has 4 blocks"),
                        # recorded, then without effect: dvc repro has no launcher
                        ("hydra/launcher=basic", "is a setting of Hydra's runs"),
                        ("hydra.run.dir=x", "is a setting of Hydra's runs"),
                        # DVC refused the dvc.yaml written: an output inside a dependency
                        ("paths.artifacts_dir=data/artifacts", "must lie outside paths.data_dir=data, which prepare"),
                        ("paths.artifacts_dir=data", "paths.artifacts_dir='data' is invalid"),
                        # dvc repro trained prepare, pretrain and transfer before DVC's raw "No such file"
                        ("distill.student_init=none.pt", "distill.student_init='none.pt' is invalid: no such file"),
                        # DVC refused it: student's model.pt both a dep and an output of student
                        ("distill.student_init=artifacts/student/model.pt", "lies in the student stage's outputs, "
                         "and student reads distill.student_init or comes after a stage that does (distill, student)"),
                        # DVC 3 refused, after prepare had run: "Saving cached external output ... is not supported"
                        (f"paths.artifacts_dir={tmp_path.parent}", f"lies outside the project {tmp_path}, and DVC"),
                        ("paths.artifacts_dir=../elsewhere", "lies outside the project"),
                        # dvc repro stopped at DVC's own "[Errno 2] No such file or directory", naming no setting
                        ("data.target.dataset=mine.zip", f"data.target.dataset=mine.zip is neither cifar10, cifar100, "
                         f"synthetic nor a folder or archive (in {tmp_path}, paths.data_dir, or absolute)"),
                        ("--cfg", "takes key=value overrides only, not --cfg. Fix: leave it out"),  # was Hydra's lexer
                        # as check-repro takes it: "leave it out" composed the default experiment
                        ("--experiment=smoke", "not --experiment=smoke. Fix: experiment=smoke, as groups are chosen")):
        assert transferkit_cli.main(["params", bad]) == 2
        err = capsys.readouterr().err
        assert needle in err and ("transferkit params" in err or "Fix: leave it out" in err), err
    for name in ("params.yaml", "dvc.yaml"):
        assert (tmp_path / name).read_text() == f"# the {name} of an earlier, valid composition\n"


def test_params_takes_a_file_an_earlier_stage_wrote_as_a_setting(tmp_path, monkeypatch, capsys):
    """DVC takes a dep inside an earlier stage's output (pretrain's model.pt for distill.student_init): no cycle."""
    import shutil

    from transferkit import cli as transferkit_cli

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "artifacts" / "pretrain").mkdir(parents=True)
    (tmp_path / "artifacts" / "pretrain" / "model.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert transferkit_cli.main(["params", "distill.student_init=artifacts/pretrain/model.pt"]) == 0, \
        capsys.readouterr().err
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "artifacts/pretrain/model.pt" in stages["distill"]["deps"]


def test_params_takes_an_artifacts_folder_that_links_elsewhere(tmp_path, monkeypatch, capsys):
    """artifacts/ as a link to scratch storage is inside the project as DVC reads paths: it was refused as outside."""
    import shutil

    from transferkit import cli as transferkit_cli

    shutil.copytree(ROOT / "conf", tmp_path / "project" / "conf")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "project" / "artifacts").symlink_to(tmp_path / "scratch")
    monkeypatch.chdir(tmp_path / "project")
    assert transferkit_cli.main(["params", "experiment=smoke"]) == 0, capsys.readouterr().err
    assert (tmp_path / "project" / "dvc.yaml").is_file()


def test_params_says_which_earlier_overrides_it_no_longer_composes_with(tmp_path, monkeypatch, capsys):
    """Overrides replace the earlier ones: on the smoke experiment, `params transfer.freeze_depth=2` alone would
    make every stage of the default (real-data) experiment stale, which no line said."""
    import shutil

    from transferkit import cli as transferkit_cli

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    assert transferkit_cli.main(["params", "experiment=smoke"]) == 0
    assert "no longer" not in capsys.readouterr().out
    assert transferkit_cli.main(["params", "experiment=smoke", "transfer.freeze_depth=2"]) == 0
    assert "no longer" not in capsys.readouterr().out
    assert transferkit_cli.main(["params", "transfer.freeze_depth=2"]) == 0
    assert ("composed with transfer.freeze_depth=2; no longer with experiment=smoke (give every override you want "
            "each time)") in capsys.readouterr().out
    for given in ("transfer.freeze_depth=3", "++transfer.freeze_depth=2"):  # a key given again is no dropped one
        assert transferkit_cli.main(["params", given]) == 0
        assert "no longer" not in capsys.readouterr().out
    (tmp_path / "params.yaml").write_text("name: cifar10_split\nseed: 0\n")  # recorded none: nothing dropped
    assert transferkit_cli.main(["params"]) == 0
    assert "no longer" not in capsys.readouterr().out
    (tmp_path / "params.yaml").write_text("name: [unclosed\n")  # damaged: params writes it again, as its fix says
    assert transferkit_cli.main(["params"]) == 0


def _error(capsys, argv: list[str]) -> str:
    """The one `error:` line of an in-process command that ends with exit code 2, before any stage runs (one that
    ran where a refusal was due would write into the checkout's artifacts/, from the folder pytest started in)."""
    from transferkit import cli as transferkit_cli

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("transferkit.stages.common.staged_output", lambda *a, **k: pytest.fail(f"{' '.join(argv)} ran"))
        assert transferkit_cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], lines
    return lines[0]


def test_params_files_that_are_not_or_no_longer_params_files(tmp_path, capsys):
    """--params FILE and --params=FILE alike; another YAML file, invalid YAML, or a params.yaml that lacks a
    key the stage reads (written from another conf/) end in one line that says to write it again."""
    import yaml

    cfg = compose("experiment=smoke", tmp=tmp_path)
    good = tmp_path / "params.yaml"
    good.write_text(params_text(cfg))
    assert not (tmp_path / "artifacts" / "prepare").exists()
    from transferkit import cli as transferkit_cli

    assert transferkit_cli.main(["prepare", f"--params={good}"]) == 0
    assert (tmp_path / "artifacts" / "prepare" / "target.pt").exists()
    assert "is not a params file composed from conf/" in _error(capsys, ["prepare", "--params", str(ROOT / "dvc.yaml")])
    conflicted = tmp_path / "conflicted.yaml"
    conflicted.write_text(good.read_text().replace("seed: 0\n", "<<<<<<< HEAD\nseed: 0\n=======\nseed: 1\n>>>>>>> b\n"))
    assert "is not valid YAML" in _error(capsys, ["prepare", "--params", str(conflicted)])
    stale = yaml.safe_load(good.read_text())
    del stale["trainer"]["sync_batchnorm"]
    (tmp_path / "stale.yaml").write_text(yaml.safe_dump(stale))
    line = _error(capsys, ["scratch", "--params", str(tmp_path / "stale.yaml")])
    assert "has no trainer.sync_batchnorm" in line and "transferkit params" in line
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe garbage")
    assert "is not valid YAML" in _error(capsys, ["transfer", "--params", str(tmp_path / "binary.yaml")])
    (tmp_path / "scalar.yaml").write_text("name: x\nseed: 0\npaths: 5\ntrainer: {}\n")
    line = _error(capsys, ["transfer", "--params", str(tmp_path / "scalar.yaml")])
    assert "is not a params file composed from conf/ (its paths is 5, not a block of keys)" in line
    # a stranger's file: OmegaConf would resolve ${oc.env:...} into the outputs' params.yaml, and nested
    # ${a}${a} references grow exponentially; transferkit writes every value resolved
    env = yaml.safe_load(good.read_text())
    env["trainer"]["loggers"] = ["csv", "${oc.env:HOME}"]
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(env))
    line = _error(capsys, ["prepare", "--params", str(tmp_path / "env.yaml")])
    assert "(its trainer.loggers.1 is a ${...} reference, which could read the environment, not a value)" in line
    # YAML's dates and sets, and a key that is no text: no setting holds them (OmegaConf raised a traceback)
    for i, (line, odd) in enumerate([("seed: 0", "seed: 2024-01-01"), ("name: smoke", "name: !!set {a, b}"),
                                     ("seed: 0", "seed: 0\nnull: 1")]):
        assert f"\n{line}\n" in good.read_text()
        (tmp_path / f"odd{i}.yaml").write_text(good.read_text().replace(f"\n{line}\n", f"\n{odd}\n"))
        line = _error(capsys, ["prepare", "--params", str(tmp_path / f"odd{i}.yaml")])
        assert "holds a value no setting can hold (" in line and "Fix: quote it to make it text" in line, line
    # OmegaConf's mark of a value not given reads as text to the schema and raised once a stage read it
    (tmp_path / "missing.yaml").write_text(good.read_text().replace("\nname: smoke\n", "\nname: ???\n"))
    line = _error(capsys, ["prepare", "--params", str(tmp_path / "missing.yaml")])
    assert "name='???' is invalid: ??? is OmegaConf's mark of a value not given" in line, line


@pytest.mark.parametrize("dvc_stage", ["prepare", ""])
def test_a_params_file_or_override_whose_artifacts_dir_is_no_text_is_one_line(tmp_path, capsys, monkeypatch, dvc_stage):
    """paths.artifacts_dir names the stage's output folder, read before run_stage validated it: a null (an empty
    value left by hand, `dvc exp run -S paths.artifacts_dir=null`) or a number ended in a TypeError traceback."""
    import yaml

    monkeypatch.setenv("DVC_STAGE", dvc_stage)
    params = yaml.safe_load(params_text(compose("experiment=smoke", tmp=tmp_path)))
    params["paths"]["artifacts_dir"] = None
    (tmp_path / "null.yaml").write_text(yaml.safe_dump(params))
    line = _error(capsys, ["prepare", "--params", str(tmp_path / "null.yaml")])
    assert "paths.artifacts_dir=None is invalid: must be a valid string" in line, line
    line = _error(capsys, ["scratch", "--params", str(ROOT / "params.yaml"), "paths.artifacts_dir=5"])
    assert "paths.artifacts_dir=5 is invalid" in line, line


def test_a_params_file_lacking_a_key_is_refused_before_the_stage_runs(tmp_path, capsys, monkeypatch):
    """pretrain reads pretrain.tta only after its fit: a file that lacks it (a line deleted by hand, an older
    conf/) must fail before the training, not throw it away."""
    import yaml


    text = params_text(compose("experiment=smoke", tmp=tmp_path), ["experiment=smoke"])  # as `transferkit params`
    stale = yaml.safe_load(text)
    del stale["pretrain"]["tta"]
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))  # the overrides it records
    (tmp_path / "stale.yaml").write_text(header + yaml.safe_dump(stale))
    line = _error(capsys, ["pretrain", "--params", str(tmp_path / "stale.yaml")])
    assert "stale.yaml has no pretrain.tta: it was written from another conf/" in line and "transferkit params" in line
    stale["pretrain"]["tta"], stale["pretrain"]["lrr"] = "flip", stale["pretrain"].pop("lr")  # a typo
    (tmp_path / "typo.yaml").write_text(header + yaml.safe_dump(stale))
    line = _error(capsys, ["pretrain", "--params", str(tmp_path / "typo.yaml")])
    typo = tmp_path / "typo.yaml"
    assert f"{typo} has pretrain.lrr, which conf/ has not (a typo for pretrain.lr?). Fix: correct it in {typo}" in line


def test_a_params_file_lacking_a_folder_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """paths.data_dir and paths.artifacts_dir have no default: a params file without one (a line deleted by hand)
    ends in one line naming the key, before the stage runs."""
    import yaml

    params = yaml.safe_load(params_text(compose("experiment=smoke", tmp=tmp_path)))
    for key in ("data_dir", "artifacts_dir"):
        lacking = {**params, "paths": {k: v for k, v in params["paths"].items() if k != key}}
        (tmp_path / "lacking.yaml").write_text(yaml.safe_dump(lacking))
        line = _error(capsys, ["prepare", "--params", str(tmp_path / "lacking.yaml")])
        assert f"paths.{key} is missing: every stage reads it" in line and "Fix:" in line, line


@pytest.mark.parametrize("content, needle", [
    ((ROOT / "params.yaml").read_text().replace("seed: 0\n", "<<<<<<< HEAD\nseed: 0\n=======\nseed: 1\n>>>>>>> b\n"),
     "params.yaml is not valid YAML"),
    (b"\x00\xff\xfe garbage", "params.yaml is not valid YAML"),
    ("", "params.yaml is not a params file composed from conf/ (it lacks ['name', 'paths', 'seed', 'trainer'])"),
    ("- a list\n", "params.yaml is not a params file composed from conf/")])
def test_check_params_on_a_file_that_is_no_params_file_says_so_in_one_line(tmp_path, content, needle):
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    params = tmp_path / "params.yaml"
    params.write_bytes(content) if isinstance(content, bytes) else params.write_text(content)
    proc = cli("check-params", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert needle in proc.stderr and "transferkit params" in proc.stderr and len(proc.stderr.splitlines()) == 2


@pytest.mark.parametrize("given, needle", [("no-such-params.yaml", "no-such-params.yaml is no file, not a params file"),
                                           ("conf", "conf is a folder, not a params file")])
def test_check_params_on_a_mistyped_path_is_one_line(given, needle):
    """Was exit 1 with "not found" and the fix `transferkit params`, which writes the project's params.yaml, not it."""
    line = one_error_line(cli("check-params", given))
    assert needle in line and "Fix: `transferkit check-params [PARAMS_FILE]`" in line, line


@pytest.mark.parametrize("given, needle", [
    ("pretrain=/no/such/folder", "--in pretrain=/no/such/folder: no such folder. Fix: give the folder the 'pretrain' "
                                 "stage wrote its outputs to."),
    ("pretrian=/tmp", "--in pretrian=/tmp: no stage by that name. Fix: --in STAGE=DIR"),
    # was ignored: transfer trained on artifacts/pretrain, whatever was meant
    ("prune=/tmp", "--in prune=/tmp: transfer reads no output of prune. Fix: --in STAGE=DIR, with STAGE one of the "
                   "stages transfer reads: prepare, pretrain."),
    # the first was dropped without a word: the run read the last, whatever was meant
    ("pretrain=/no/such/folder pretrain=/tmp", "--in pretrain=/tmp: given twice. Fix: --in STAGE=DIR"),
])
def test_a_bad_input_folder_is_named_as_given(given, needle):
    folders = [arg for item in given.split() for arg in ("--in", item)]
    line = one_error_line(cli("transfer", "--params", "params.yaml", *folders, "--out", "/no/such/out"))
    assert needle in line


def test_an_input_folder_of_another_stage_is_named_as_such(smoke_artifacts, tmp_path):
    """--in pretrain=artifacts/prepare: the fix said "run the 'pretrain' stage first", which had run."""
    from transferkit.config.compose import params_text

    cfg, _ = smoke_artifacts
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    prepared = f"{cfg.paths.artifacts_dir}/prepare"
    line = one_error_line(cli("transfer", "--params", "params.yaml", "--in", f"pretrain={prepared}", "--out", "out",
                              cwd=tmp_path))
    assert (f"not found at {prepared}/model.pt. Fix: give the folder the 'pretrain' stage wrote (--in pretrain=DIR), "
            f"or run the 'pretrain' stage first") in line
    assert not (tmp_path / "out").exists()


def test_a_key_given_twice_is_refused_by_name_wherever_overrides_are_read(capsys, tmp_path, monkeypatch):
    """Hydra would keep the last value without a word; `transferkit params` would record both, one unapplied. Run in
    a copy of the project: were the refusal to break, `transferkit params` would write the copy's files."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("params.yaml", "dvc.yaml")}
    for argv, given in [(["params", "experiment=smoke", "pretrain.epochs=1", "pretrain.epochs=2"],
                         "(pretrain.epochs=1 and pretrain.epochs=2)"),
                        (["params", "model=resnet18", "model=fastnet"], "(model=resnet18 and model=fastnet)"),
                        (["pretrain", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out"),
                          "seed=1", "seed=2"], "(seed=1 and seed=2)"),
                        (["pretrain", "seed=1", "+seed=2", "--cfg", "job"], "(seed=1 and +seed=2)"),
                        (["sweep", "transfer", "seed=1", "seed=2"], "(seed=1 and seed=2)")]:
        line = _error(capsys, argv)
        assert f"is given twice {given}" in line and "Fix: give it once" in line, line
    assert "seed is given more than once (seed=0,1 and seed=2)" in _error(capsys, ["sweep", "transfer", "seed=0,1",
                                                                                 "seed=2"])
    assert {name: (tmp_path / name).read_bytes() for name in before} == before and not (tmp_path / "out").exists()


def test_check_params_refuses_overrides(capsys, tmp_path):
    line = _error(capsys, ["check-params", "experiment=smoke"])
    assert "check-params takes a params file, not overrides (experiment=smoke)" in line and "Fix:" in line
    (tmp_path / "seed=1").mkdir()  # a Hydra job folder: a path with "=" in it
    (tmp_path / "seed=1" / "params.yaml").write_text("seed: [unclosed\n")
    from transferkit import cli as transferkit_cli

    assert transferkit_cli.main(["check-params", str(tmp_path / "seed=1" / "params.yaml")]) == 1  # read, and drifted
    assert "is not valid YAML" in capsys.readouterr().err


def test_params_refuses_what_a_stage_would_refuse_and_keeps_its_files(tmp_path, monkeypatch, capsys):
    """A params.yaml without seed or with a null folder would be refused by every stage (or crash it):
    `transferkit params` refuses it before writing."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text("# earlier\n")
    for bad, needle in (("~seed", "seed is missing"),
                        ("~transfer.backbone_lr_mult", "transfer.backbone_lr_mult is missing: the stages read it"),
                        ("~distill.student", "distill.student is missing"),
                        ("~evaluate.tta", "evaluate.tta is missing"),
                        # found by prune when it starts, hours into `dvc repro`: found by params before it writes
                        ("prune.keep=[hed]", "prune.keep names ['hed']"), ("prune.rates=[1,2]", "prune.rates has 2"),
                        ("paths.artifacts_dir=null", "paths.artifacts_dir=None is invalid"),
                        ("paths=5", "paths=5 is invalid"), ("name=[1]", "name=[1] is invalid"),
                        ("+transfer.lrr=0.1", "no stage reads transfer.lrr (did you mean transfer.lr or"),
                        ("+seedx=1", "no stage reads seedx (did you mean seed?)")):
        assert needle in _error(capsys, ["params", bad])
    for name in ("params.yaml", "dvc.yaml"):
        assert (tmp_path / name).read_text() == "# earlier\n"


@pytest.mark.parametrize("args, needle", [
    (["--params", "/tmp"], "/tmp is not a file"),
    (["--params", "params.yaml", "seed"], "seed: an override is key=value"),
    (["--params", "params.yaml", "transfer.lr=[1"], "transfer.lr=[1: not a value"),
    (["--params", "params.yaml", "transfer.lrr=1"],
     "params.yaml has no setting transfer.lrr (did you mean transfer.lr"),
    (["--params", "params.yaml", "+transfer.lrr=1"],  # Hydra's "add": the file must have the key all the same
     "params.yaml has no setting transfer.lrr (did you mean transfer.lr"),
    # read by Hydra's grammar, as Hydra runs read them: YAML 1.1 made 010 the octal 8 and yes a boolean
    (["--params", "params.yaml", "seed=010"], "seed='010' is invalid: must be a valid integer"),
    (["--params", "params.yaml", "trainer.progress_bar=yes"], "trainer.progress_bar='yes' is invalid"),
    (["--params", "params.yaml", "transfer.freeze_depth=0,1"],
     "to run each value, `transferkit pretrain -m transfer.freeze_depth=0,1`"),
    (["--params", "params.yaml", "~seed=1"], "seed is missing: the stages read it"),
    (["--params", "params.yaml", "~seed"], "seed is missing: the stages read it"),
    (["--params", "params.yaml", "data.target.classes.x=1"], "data.target.classes.x=1: invalid literal for int()"),
    (["--params", "params.yaml", "model=resnet18"], "model=resnet18: params.yaml holds settings, not conf/'s config"),
    (["--params", "params.yaml", "model@distill.student=fastnet"], "set its keys one by one (distill.student.KEY"),
    # an experiment sets keys all over the config: there is no experiment.KEY to set
    (["--params", "params.yaml", "experiment=smoke"], "(`transferkit params experiment=smoke`)."),
    # Hydra's flags were "an override is key=value"
    # `transferkit sweep` takes the stages whose models collect scores, not pretrain
    (["--params", "params.yaml", "-m", "seed=1"], "-m: a run from a params file takes --params, --out and --in, not "
                                                  "Hydra's flags. Fix: leave it out; to sweep, `transferkit pretrain "
                                                  "-m key=a,b`, composed from conf/."),
])
def test_a_stage_given_a_bad_params_file_or_override_says_so_in_one_line(capsys, args, needle):
    line = _error(capsys, ["pretrain", *args])
    assert needle in line and "Fix:" in line, line


def test_a_params_file_run_of_a_scored_stage_offers_transferkit_sweep(capsys):
    assert "to run each value, `transferkit sweep transfer seed=0,1`." in _error(
        capsys, ["transfer", "--params", "params.yaml", "seed=0,1"])
    assert "to sweep, `transferkit sweep distill key=a,b`, composed from conf/." in _error(
        capsys, ["distill", "--params", "params.yaml", "-m"])


def test_check_params_finds_the_project_from_a_subfolder_and_names_what_it_refuses(capsys):
    proc = cli("check-params", cwd=ROOT / "src")
    assert proc.returncode == 0, proc.stderr
    assert "(seed=1)" in _error(capsys, ["check-params", "params.yaml", "seed=1"])
    assert "--foo" in _error(capsys, ["check-params", "--foo"])
    assert "one params file" in _error(capsys, ["check-params", "params.yaml", "params.yaml"])


def test_a_sweep_value_without_multirun_is_one_line_naming_the_two_ways(tmp_path):
    line = one_error_line(cli("transfer", "experiment=smoke", "transfer.freeze_depth=0,1", *outside(tmp_path)))
    assert "transfer.freeze_depth=0,1 lists several values" in line and "-m" in line and "transferkit sweep" in line


def test_hydra_mode_multirun_runs_a_sweep_as_minus_m_does(tmp_path):
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    proc = cli("prepare", "experiment=smoke", "hydra.mode=MULTIRUN", "seed=0,1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "multirun").rglob("target.pt"))) == 2


def test_unknown_command():
    proc = cli("pretrian")
    assert proc.returncode == 2 and "unknown command 'pretrian'" in proc.stderr


def test_params_help_says_overrides_replace_the_earlier_ones_and_names_check_params(capsys):
    """It printed its one usage line, which left out both."""
    from transferkit import cli as transferkit_cli

    assert transferkit_cli.main(["params", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("  transferkit params [key=value ...]") and "they replace the earlier ones" in out, out
    assert "transferkit check-params [FILE]" in out and "transferkit sweep" not in out, out


def test_version_is_the_installed_packages():
    """`transferkit --version` was an unknown command."""
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        proc = cli(flag)
        assert proc.returncode == 0 and proc.stdout == f"transferkit {version('transferkit')}\n", proc.stderr


def test_unknown_override_key_via_hydra_mode(tmp_path):
    line = one_error_line(cli("transfer", "experiment=smoke", "transfer.freez_depth=1", *outside(tmp_path), cwd=ROOT))
    assert "freez_depth" in line


@pytest.mark.parametrize("override, needle", [
    ("data.target.classes=[cat,dgo,horse]", ("unknown class 'dgo'",)),
    ("data.target.classes=[cat,DOG]", ("unknown class 'DOG'", "Did you mean ['dog']?")),  # case: no close match
    ("data.target.classes=[0,1]", ("(item 0: 0)", "quote it, as in ['0','1']")),  # numbered class folders
    ("data.target.train_per_class=5000", ("class 'cat' has 5 train images", "asks for 5000")),
])
def test_bad_data_choices_on_the_real_layout(tmp_path, override, needle):
    # a tiny image-folder archive with the real CIFAR-10 class names
    from conftest import CIFAR10_CLASSES, write_image_folder

    write_image_folder(tmp_path / "data", CIFAR10_CLASSES, train_per_class=5, test_per_class=1)
    cfg = compose(override, tmp=tmp_path)
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    line = one_error_line(cli("prepare", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path))
    assert all(part in line for part in needle), line


def test_under_dvc_the_first_stage_refuses_a_value_a_later_stage_cannot_run_with(tmp_path, monkeypatch):
    """`dvc exp run -S transfer.freeze_depth=9` writes params.yaml past `transferkit params`' checks: prepare and
    pretrain ran (an hour of the default pipeline on a CPU) before transfer refused the depth."""
    from transferkit.errors import TransferkitError

    monkeypatch.chdir(tmp_path)
    cfg = compose("experiment=smoke", "transfer.freeze_depth=9", tmp=tmp_path)
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  prepare:\n    cmd: transferkit prepare --params params.yaml\n"
                                       f"    deps:\n    - {cfg.paths.data_dir}\n    outs:\n"
                                       f"    - {cfg.paths.artifacts_dir}/prepare\n")  # where the stage's outputs go
    monkeypatch.setenv("DVC_STAGE", "prepare")  # DVC runs it in the folder of its dvc.yaml
    with pytest.raises(TransferkitError, match="transfer.freeze_depth=9 is invalid: model 'fastnet' has 4 blocks"):
        run("prepare", cfg)
    assert not (tmp_path / "artifacts" / "prepare").exists()
    # a sweep's point (pointN to DVC) and a run by hand check what the stage reads, as `transferkit sweep` does
    for dvc_stage in ("sweeps/smoke-prepare/dvc.yaml:point0", None):
        if dvc_stage:
            monkeypatch.setenv("DVC_STAGE", dvc_stage)
        else:
            monkeypatch.delenv("DVC_STAGE")
        shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)
        run("prepare", cfg)
        assert (tmp_path / "artifacts" / "prepare" / "target.pt").is_file()


def test_a_stage_run_by_hand_into_the_folder_dvc_keeps_says_how_to_record_it(tmp_path, monkeypatch, capsys, caplog):
    """DVC sees a hand run's outputs in artifacts/ as changed, and its next `dvc repro` made them and every stage
    after them again without a word: the run says so, and how to record them instead; under `dvc repro`
    (DVC_STAGE set) it says nothing, and into another folder where the outputs went."""
    def shown() -> str:  # printed, or logged where a Hydra app (pytest too) has handlers
        text = capsys.readouterr().out + caplog.text
        caplog.clear()
        return text

    caplog.set_level("INFO", logger="transferkit")
    monkeypatch.chdir(tmp_path)
    cfg = compose("experiment=smoke", tmp=tmp_path)  # paths.artifacts_dir: tmp_path/artifacts, as dvc.yaml has it
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  prepare:\n    cmd: transferkit prepare --params params.yaml\n"
                                       f"    deps:\n    - {cfg.paths.data_dir}\n    outs:\n"
                                       f"    - {cfg.paths.artifacts_dir}/prepare\n")
    run("prepare", cfg)
    assert (f"{tmp_path / 'artifacts' / 'prepare'} is where `dvc repro` keeps prepare's outputs, and DVC did not make "
        f"these: `dvc commit -f prepare` records them if params.yaml holds the settings they were made with; else the "
        f"next `dvc repro` runs prepare and the stages after it again.") in shown()
    monkeypatch.setenv("DVC_STAGE", "prepare")
    run("prepare", cfg)
    assert "prepare" not in shown()
    monkeypatch.delenv("DVC_STAGE")
    from transferkit.stages.run import run_stage

    run_stage("prepare", cfg, tmp_path / "elsewhere")
    text = shown()
    assert "dvc commit" not in text and f"prepare: outputs in {tmp_path / 'elsewhere'}" in text
    # beside the project's params.yaml: it holds the settings, or the run had an override, which `dvc commit` would
    # have recorded under params.yaml's settings (the report then compared models trained otherwise than it says)
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    run("prepare", cfg)
    assert "`dvc commit -f prepare` records them (params.yaml holds their settings); without it the next" in shown()
    run("prepare", compose("experiment=smoke", "seed=3", "data.target.val_per_class=2", tmp=tmp_path))
    assert ("these were made with settings params.yaml does not hold (data.target.val_per_class=2, seed=3): the next "
            "`dvc repro` runs prepare and the stages after it again. To keep them, write params.yaml with those "
            "settings (`transferkit params` with your overrides), then `dvc commit -f prepare`.") in shown()


def test_a_hand_run_with_a_setting_an_earlier_stage_tracks_too_is_not_offered_dvc_commit(tmp_path, monkeypatch):
    """trainer.devices is pretrain's setting too: written into params.yaml it reruns pretrain, then transfer, so
    `dvc commit -f transfer` keeps nothing (walk L86); a setting of transfer's alone can be kept so."""
    from transferkit.stages.run import hand_run_note

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke", "trainer=ddp", tmp=tmp_path)))
    out = tmp_path / "artifacts" / "transfer"
    note = hand_run_note("transfer", compose("experiment=smoke", "trainer=ddp", "trainer.devices=3", tmp=tmp_path), out)
    assert note.endswith("made with settings params.yaml does not hold (trainer.devices=3): the next `dvc repro` runs "
                         "transfer and the stages after it again. They cannot be kept: trainer.devices is pretrain's "
                         "setting too, so with it in params.yaml `dvc repro` runs pretrain again, and transfer after "
                         "it (to have them made so, `transferkit params` with your overrides, then `dvc repro`).")
    note = hand_run_note("transfer", compose("experiment=smoke", "trainer=ddp", "transfer.lr=0.5", tmp=tmp_path), out)
    assert note.endswith("(transfer.lr=0.5): the next `dvc repro` runs transfer and the stages after it again. To keep "
                         "them, write params.yaml with those settings (`transferkit params` with your overrides), then "
                         "`dvc commit -f transfer`.")
    assert "They cannot be kept: seed is prepare's setting too" in hand_run_note(
        "distill", compose("experiment=smoke", "trainer=ddp", "seed=4", tmp=tmp_path), out)
    assert "They cannot be kept: model.widths is pretrain's setting too" in hand_run_note(
        "transfer", compose("experiment=smoke", "trainer=ddp", "model.widths=[8,8,8]", tmp=tmp_path), out)


def test_a_stage_command_prints_where_its_outputs_went(tmp_path):
    """`transferkit STAGE --params` configures no logging: its closing line is printed, not handed to a logger that
    shows nothing."""
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke", tmp=tmp_path)))
    proc = cli("prepare", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"prepare: outputs in {tmp_path / 'artifacts' / 'prepare'}" in proc.stdout.splitlines()


def test_missing_dataset_through_the_cli_keeps_previous_outputs(tmp_path):
    ok = compose("experiment=smoke", tmp=tmp_path)
    run("prepare", ok)
    before = (tmp_path / "artifacts" / "prepare" / "target.pt").read_bytes()
    cfg = compose("data.download=false", tmp=tmp_path)  # cifar10_split with an empty data/
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    line = one_error_line(cli("prepare", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path))
    assert "CIFAR10 not found" in line and "experiment=smoke" in line
    assert (tmp_path / "artifacts" / "prepare" / "target.pt").read_bytes() == before


def test_a_path_this_user_may_not_open_or_too_long_a_name_is_one_error_line(smoke_artifacts, tmp_path, monkeypatch,
                                                                            capsys):
    """Path.is_dir() and friends raise for EACCES and ENAMETOOLONG (only a missing file reads as False): predict,
    export and prepare ended in a PermissionError or 'File name too long' traceback."""
    import errno
    from pathlib import Path

    from transferkit import cli as transferkit

    cfg, _ = smoke_artifacts
    model, long_name = Path(cfg.paths.artifacts_dir) / "export" / "model.onnx", str(tmp_path / ("a" * 300 + ".png"))
    line = one_error_line(cli("predict", str(model), long_name))
    assert f"cannot use {long_name} (File name too long). Fix: give a shorter path." in line
    locked = tmp_path / "locked"
    is_dir = Path.is_dir

    def refused(path):
        if path == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return is_dir(path)

    monkeypatch.setattr(Path, "is_dir", refused)  # as for a user other than root, whom no permission stops
    assert transferkit.main(["predict", str(model), str(locked)]) == 2
    assert capsys.readouterr().err.strip() == (f"transferkit predict: error: cannot use {locked} (Permission denied). "
                                               f"Fix: give this user access to it and the folders above it (`ls -ld` "
                                               f"shows who may), or give another path.")
    def broken(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(Path, "is_dir", broken)
    with pytest.raises(OSError, match="Input/output error"):  # any other OSError: a bug's traceback
        transferkit.main(["predict", str(model), str(locked)])


def test_tqdm_disable_turns_the_progress_bars_off_on_a_terminal_too(monkeypatch):
    import io
    import sys

    from transferkit.progress import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for value, drawn in (("1", False), ("", True)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        monkeypatch.setattr(sys, "stderr", Terminal())
        assert list(progress(range(3), "scoring", "model")) == [0, 1, 2]
        assert ("scoring" in sys.stderr.getvalue()) == drawn


def test_tqdm_disable_turns_lightnings_training_bar_off_on_a_terminal_too(monkeypatch, tmp_path):
    """Lightning gives tqdm its `disable` itself, which wins over TQDM_DISABLE: the training bar still drew."""
    import io
    import sys

    from transferkit.training.trainer import make_trainer

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    for value, drawn in (("1", False), ("", True)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        trainer = make_trainer({"loggers": []}, tmp_path / value, max_epochs=1)
        assert (trainer.progress_bar_callback is not None) == drawn


def test_prepare_and_evaluate_draw_progress_bars_on_a_terminal_only(smoke_artifacts, tmp_path):
    """The long steps outside training show tqdm bars on a terminal, and nothing in a log."""
    import fcntl
    import pty
    import shutil
    import struct
    import subprocess
    import sys
    import termios

    from conftest import CIFAR10_CLASSES, compose, write_image_folder
    from transferkit.config.compose import params_text

    archive = write_image_folder(tmp_path / "data", CIFAR10_CLASSES, train_per_class=3, test_per_class=1)
    cfg = compose("experiment=smoke", f"data.source.dataset={archive}", f"data.target.dataset={archive}",
                  "data.target.train_per_class=2", "data.target.val_per_class=1", "data.source.val_per_class=1",
                  "data.source.classes=[airplane,ship]", "data.target.classes=[cat,dog]", tmp=tmp_path)
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "smoke")
    smoke = compose("experiment=smoke", f"paths.artifacts_dir={tmp_path / 'smoke'}")
    (tmp_path / "smoke.yaml").write_text(params_text(smoke))

    def stderr_of(stage: str, params: str, terminal: bool) -> str:
        cmd = [sys.executable, "-m", "transferkit.cli", stage, "--params", params]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": ""}
        if not terminal:
            return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300).stderr
        leader, follower = pty.openpty()
        # a terminal of 100 columns: a fresh pty has 0, where tqdm draws nothing
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-2000:]
        os.close(leader)
        return b"".join(chunks).decode(errors="replace")

    assert "decoding train images" in stderr_of("prepare", "params.yaml", terminal=True)
    assert "scoring models" in stderr_of("evaluate", "smoke.yaml", terminal=True)
    assert "decoding" not in stderr_of("prepare", "params.yaml", terminal=False)


def test_output_cut_short_by_its_reader_ends_quietly(smoke_artifacts):
    """`transferkit results | head -c 1`: once head exits, the next write fails with EPIPE."""
    import shlex
    import subprocess
    import sys

    evaluate = Path(smoke_artifacts[0].paths.artifacts_dir) / "evaluate"
    command = f"{shlex.quote(sys.executable)} -m transferkit.cli results {shlex.quote(str(evaluate))}"
    proc = subprocess.run(f"{command} | head -c 1", shell=True, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout == "|" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    for help_ in ("--help", "params --help"):  # printed before any command runs: a closed pipe there too
        proc = subprocess.run(f"{shlex.quote(sys.executable)} -m transferkit.cli {help_} | head -c 1", shell=True,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout in ("u", " ") and "Traceback" not in proc.stderr, proc.stderr


def test_a_completion_script_cut_short_by_its_reader_ends_quietly():
    """`transferkit -sc install=bash | head -1`: Hydra prints the script, and reported a closed pipe in a traceback."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # a reader gone before the first write: the write fails with EPIPE every time
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli", "-sc", "install=bash"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.stderr == "" and proc.returncode == -signal.SIGPIPE  # as `yes | head` ends: no output, no line


def test_minus_m_among_the_overrides_runs_the_sweep(tmp_path):
    """Hydra's parser takes flags before the overrides only (`a=1 -m b=2` was "unrecognized arguments: b=2")."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    proc = cli("prepare", "experiment=smoke", "-m", "seed=0,1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "multirun").rglob("target.pt"))) == 2


@pytest.mark.parametrize("argv, needle", [(["--cfg", "job", "-m"], "--multirun and --cfg ask for two things"),
                                          (["-m", "-c", "job"], "--multirun and --cfg ask for two things"),
                                          (["--inf", "--multirun"], "--multirun and --info ask"),  # abbreviated
                                          (["--resolve"], "--resolve resolves the config that --cfg or --help"),
                                          (["-p", "my.yaml"], "--package picks the package of the config that --cfg"
                                                              " or --help prints. Fix: .*; a params file is --params"),
                                          (["--pa", "my.yaml"], "--package picks the package"),  # abbreviated
                                          (["seed=1", "--foo"], "unrecognized arguments: --foo. Fix: Hydra's flags"),
                                          (["--param", "p.yaml"], "--param. Fix: .*; a params file is --params FILE"),
                                          (["--cfg"], "argument --cfg/-c: expected one argument. Fix:")])
def test_flags_hydra_refuses_together_are_one_line(capsys, argv, needle):
    """Hydra runs one of a run, a multirun, --cfg and --info, and resolves only what it prints: its ValueError
    traceback before; a flag it does not know, or one without its value, was argparse's usage block and a line."""
    line = _error(capsys, ["transfer", *argv])
    assert re.search(needle, line) and "Fix:" in line, line


def test_hydras_rerun_of_a_pickle_is_refused_before_the_file_is_read(capsys, tmp_path):
    """--experimental-rerun FILE made Hydra pickle.load FILE: a config.pickle from a stranger's run folder ran its code
    (and any other file ended in a traceback)."""
    import pickle

    class Runs:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    (tmp_path / "config.pickle").write_bytes(pickle.dumps(Runs()))
    line = _error(capsys, ["transfer", "experiment=smoke", "--experimental-rerun", str(tmp_path / "config.pickle")])
    assert "Hydra unpickles that file, which runs any code it holds" in line and "Fix:" in line, line
    assert not (tmp_path / "ran").exists()


def test_a_flag_with_a_value_among_the_overrides_is_read_as_hydra_reads_it(tmp_path):
    """`--cfg job seed=3` was "unrecognized arguments: seed=3" from Hydra's parser."""
    away = outside(tmp_path)  # were a flag read as an override, prepare would run here
    proc = cli("prepare", "experiment=smoke", "--cfg", "job", "seed=3", "-p", "seed", *away)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]
    proc = cli("prepare", "experiment=smoke", *away, "seed=3", "--info")  # --info last takes no value
    assert proc.returncode == 0 and "seed: 3" in proc.stdout, proc.stderr[-2000:]
    proc = cli("prepare", "--cfg", "job", "-p", "seed", "--", "experiment=smoke", "seed=-5", *away)  # argparse's --
    assert proc.returncode == 0 and proc.stdout.strip() == "-5", proc.stderr[-2000:]
    proc = cli("prepare", "--help", "-m", "--cfg", "job")  # help first, as Hydra gives it: two modes are no error
    assert proc.returncode == 0 and "dvc.yaml runs it: transferkit STAGE --params" in proc.stdout, proc.stderr[-2000:]
    proc = cli("prepare", "experiment=smoke", "--hydra-help")  # Hydra's own help, which no override changes
    assert proc.returncode == 0 and "== Flags ==" in proc.stdout, proc.stderr[-2000:]
    proc = cli("prepare", "--info", "plugins", "seed=0,1")  # it composes no config: a sweep's values are fine
    assert proc.returncode == 0 and "Sweeper" in proc.stdout, proc.stderr[-2000:]
    line = one_error_line(cli("prepare", "seed=1,2", "--cfg", "job", *away))  # a config holds one value: was 6 lines
    assert "seed=1,2 lists several values, and a composition holds one run's" in line, line


def test_a_run_folder_lies_in_a_tracked_one_by_where_it_leads(tmp_path):
    """By text alone data/../outputs was inside data/, and a folder reached through a link to data/ was not."""
    from transferkit.config.hydra_callbacks import _within

    (tmp_path / "real").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "real")
    assert not _within(tmp_path / "data" / ".." / "outputs", tmp_path / "data")
    data = tmp_path / "data"
    assert _within(tmp_path / "real" / "run", data) and _within(data / "run", data)
    assert not _within(tmp_path / "outputs", tmp_path / "data")


@pytest.mark.parametrize("argv, key", [(["seed=0"], "hydra.run.dir"), (["-m", "seed=0,1"], "hydra.sweep.dir")])
def test_a_hydra_output_folder_that_cannot_be_made_is_one_line(tmp_path, argv, key):
    """A file in its path, a link to nothing, or a folder that takes none (/proc, root's too) was Hydra's
    traceback; --cfg, which writes no folder, still prints the config."""
    (tmp_path / "file").write_text("")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    for bad, problem in ((tmp_path / "file" / "out", "is a file"), (tmp_path / "broken", "is a link to nothing"),
                         (Path("/proc/transferkit"), "no folder can be made in /proc")):  # even as root
        line = one_error_line(cli("prepare", "experiment=smoke", *argv, f"{key}={bad}", *outside(tmp_path), cwd=ROOT))
        assert f"{key}={bad} cannot be made" in line and problem in line and "Fix:" in line, line
    assert not (tmp_path / "nowhere").exists()
    # inside what DVC tracks: Hydra wrote .hydra/ and its log into a stage's outputs before the stage refused
    for inside, what in ((tmp_path / "artifacts" / "transfer", "transfer's outputs"),
                         (tmp_path / "data" / "runs", "paths.data_dir, prepare's input")):
        paths = [f"paths.artifacts_dir={tmp_path / 'artifacts'}", f"paths.data_dir={tmp_path / 'data'}"]
        line = one_error_line(cli("prepare", "experiment=smoke", *argv, f"{key}={inside}", *paths, cwd=ROOT))
        assert f"{key}={inside} is inside {what}, which DVC tracks" in line and "Fix:" in line, line
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "data").exists()
    # from a subfolder of the project: artifacts/ read there ("run prepare first", though it ran), outputs/ left
    line = one_error_line(cli("prepare", "experiment=smoke", *argv, cwd=ROOT / "docs"))
    assert (f"paths.data_dir=data is relative to the folder a run starts in, and this one starts in {ROOT / 'docs'}, "
            f"not in the project {ROOT}") in line and "Fix:" in line, line
    assert not any((ROOT / "docs" / name).exists() for name in ("outputs", "multirun"))
    run_dir = tmp_path / "run"  # hydra.job.chdir=true: the job starts there, as from a subfolder
    line = one_error_line(cli("prepare", "experiment=smoke", *argv, "hydra.job.chdir=true", f"{key}={run_dir}",
                              cwd=ROOT))
    assert (f"paths.data_dir=data is relative to the folder a run starts in, and this one starts in {run_dir} "
            f"(hydra.job.chdir=true)") in line and "without hydra.job.chdir=true" in line, line
    folder = f"{key}={tmp_path / 'file' / 'out'}"
    proc = cli("prepare", "experiment=smoke", "seed=0", folder, "--cfg", "job", cwd=ROOT)
    assert proc.returncode == 0 and "seed: 0" in proc.stdout, proc.stderr[-2000:]


def test_shell_completion_completes_the_command_then_a_stages_overrides(tmp_path):
    """Hydra's install script registered "transferkit pretrain", a name with a space that bash never completes,
    and asked `transferkit -sc query=bash`, an unknown command: the shell completed nothing."""
    import shutil
    import subprocess
    import sys

    script = cli("pretrain", "-sc", "install=bash").stdout
    assert script.rstrip().endswith("hydra_bash_completion transferkit"), script[-300:]
    assert cli("-sc", "install=bash", cwd=tmp_path).stdout == script  # as `transferkit --help` gives it, anywhere
    assert "complete -c transferkit -x" in cli("-sc", "install=fish").stdout
    for argv in (["-sc"], ["-sc", "install"], ["-sc", "install=tcsh"], ["pretrain", "-sc", "install=bash", "seed=1"]):
        line = one_error_line(cli(*argv))  # Hydra's traceback: "Expecting one subcommand"
        assert "--shell-completion takes install=SHELL or uninstall=SHELL" in line and "Fix: eval" in line, line
    (tmp_path / "install.sh").write_text(script)
    ask = ('source "$0"; for line in "$@"; do COMP_LINE=$line; COMP_POINT=${#line}; COMP_WORDS=($line); '
           'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); hydra_bash_completion; echo "${COMPREPLY[*]}"; done')
    lines = ["transferkit pre", "transferkit pretrain model=fastnet_s", "transferkit transfer -m seed=0,1 trainer=g",
             "transferkit pretrain 'half-typed trainer=g"]  # a line Hydra cannot parse: nothing, not its error
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # where `transferkit` is installed
    proc = subprocess.run([shutil.which("bash"), "-c", ask, tmp_path / "install.sh", *lines], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": path})
    assert proc.stdout.splitlines() == ["prepare pretrain predict", "model=fastnet_student", "trainer=gpu", ""], proc
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["predict", "model.pt", "x.png", "--top", "0"], "--top must be >= 1. Fix: see `transferkit predict --help`"),
    (["export", "model.pt", "--tolerance", "nan"], "--tolerance must be a number > 0"),  # nan passed `<= 0`
    (["export", "model.pt", "--opset", "5"], "argument --opset: invalid choice: 5"),  # 167 lines of the exporters
    (["export"], "the following arguments are required: model. Fix: see `transferkit export --help`"),
    (["collect", "--bogus"], "unrecognized arguments: --bogus"),
    (["check-repro", "--target", "nope"], "argument --target: invalid choice: 'nope'"),
    (["transfer", "--params"], "expected one argument. Fix: transferkit transfer --params FILE [--out DIR]")])
def test_a_bad_option_is_one_line_not_a_usage_block(capsys, argv, needle):
    """argparse printed its usage block before the error line (and export ran on with an opset no exporter writes
    or a tolerance of nan, which nothing exceeds)."""
    line = _error(capsys, argv)
    assert needle in line, line  # _error: one line on stderr, no usage block before it


def test_collect_onto_a_file_is_one_line_before_any_scoring(smoke_artifacts, tmp_path, capsys):
    """It was a FileExistsError traceback."""
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        line = _error(capsys, ["collect", smoke_artifacts[0].paths.artifacts_dir, "--out", str(out)])
        assert f"cannot write to {out}: a file stands where the folder would be. Fix:" in line, line


def test_check_params_says_a_missing_dvc_yaml_is_missing(tmp_path, capsys):
    """It said the dvc.yaml that is not there "differs from the stage table"."""
    import shutil

    from transferkit import cli as transferkit_cli

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert transferkit_cli.main(["check-params", str(tmp_path / "params.yaml")]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"{tmp_path / 'dvc.yaml'} is missing: the stage table writes it"


def test_check_params_says_a_dvc_yaml_edited_by_hand_differs_from_the_stage_table(tmp_path, capsys):
    """dvc.yaml is generated: one that differs from what the stage table makes of params.yaml (a stage's command
    edited by hand, settings changed without it) is drift, and check-params exits 1 naming where it differs."""
    import shutil

    import yaml

    from transferkit.config.compose import to_params

    from transferkit import cli as transferkit_cli

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    assert transferkit_cli.main(["check-params", str(tmp_path / "params.yaml")]) == 0
    capsys.readouterr()
    text = (tmp_path / "dvc.yaml").read_text()
    assert "transferkit transfer --params params.yaml" in text
    (tmp_path / "dvc.yaml").write_text(text.replace("transferkit transfer --params params.yaml",
                                                    "transferkit transfer --params other.yaml"))
    made = ("from what the stage table (src/transferkit/stages/__init__.py) and the code its stages import write "
            "for params.yaml's settings")
    assert transferkit_cli.main(["check-params", str(tmp_path / "params.yaml")]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"{tmp_path / 'dvc.yaml'} differs (transfer's cmd) {made}"
    (tmp_path / "dvc.yaml").write_text(text + "[")
    assert transferkit_cli.main(["check-params", str(tmp_path / "params.yaml")]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"{tmp_path / 'dvc.yaml'} differs {made}"  # no YAML: all of it
    lacking = yaml.safe_load(text)
    del lacking["stages"]["student"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(lacking))  # written otherwise, and lacking a stage
    assert transferkit_cli.main(["check-params", str(tmp_path / "params.yaml")]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"{tmp_path / 'dvc.yaml'} differs (stage student) {made}"
    # `dvc exp run -S experiment=smoke` composes params.yaml (with no header) and leaves dvc.yaml as it was: it
    # was blamed on the stage table or the code
    (tmp_path / "dvc.yaml").write_text(text)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_params(compose("experiment=smoke")), sort_keys=False))
    assert transferkit_cli.main(["check-params", str(tmp_path / "params.yaml")]) == 1
    drift, fix = capsys.readouterr().err.splitlines()
    assert drift == f"{tmp_path / 'dvc.yaml'} differs (plots) {made}"
    assert fix.startswith("Fix: run `transferkit params experiment=smoke` to compose conf/ as it is now"), fix


def test_check_params_says_an_override_its_header_records_is_gone_from_conf(tmp_path, capsys):
    """A renamed experiment: it said "experiment=smokey: conf/experiment/ has no such option", not that the value
    comes from params.yaml's header, and exited 2 as for a bad command."""
    import shutil

    from transferkit import cli as transferkit_cli

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^# overrides:.*$", "# overrides: experiment=smokey", text))
    assert transferkit_cli.main(["check-params", str(tmp_path / "params.yaml")]) == 1
    drift, fix = capsys.readouterr().err.splitlines()
    assert drift == (f"{tmp_path / 'params.yaml'} is composed with experiment=smokey (its header says so), which "
                     f"conf/ composes no longer: experiment=smokey: conf/experiment/ has no such option.")
    assert fix.startswith("Fix: run `transferkit params` with overrides conf/ has (use one of cifar10_full, "), fix


@pytest.mark.parametrize("code", ["EACCES", "EPERM"])
def test_an_input_folder_the_system_refuses_is_one_line_naming_it(capsys, monkeypatch, tmp_path, code):
    """Permission denied and Operation not permitted (an ACL, a mount or a security module that forbids it, to
    root too) alike: the path and the fix in one line, not a traceback."""
    import errno

    locked, is_dir, number = tmp_path / "locked", Path.is_dir, getattr(errno, code)

    def refused(path):
        if path == locked:
            raise PermissionError(number, os.strerror(number), str(path))
        return is_dir(path)

    monkeypatch.setattr(Path, "is_dir", refused)
    line = _error(capsys, ["transfer", "--params", str(ROOT / "params.yaml"), "--in", f"pretrain={locked}"])
    assert f"cannot use {locked} ({os.strerror(number)}). Fix: give this user access to it" in line


def test_an_error_line_shows_control_characters_as_text_and_keeps_a_quoted_newline(capsys):
    """A message quoting what the user typed cannot drive the terminal: an escape sequence in it is shown as its
    escape; a newline it quotes (dvc's output) stays a newline."""
    from transferkit.errors import TransferkitError, error_line

    line = _error(capsys, ["transfer", "--params", str(ROOT / "params.yaml"), "--in", "pretrian=\x1b[2J"])
    assert "\x1b" not in line and "--in pretrian=\\x1b[2J: no stage by that name" in line
    assert (error_line("check-repro", TransferkitError("dvc repro failed:\nERROR: \x1b[31mfailed")) ==
            "transferkit check-repro: error: dvc repro failed:\nERROR: \\x1b[31mfailed")


@pytest.mark.parametrize("ending, code, stderr", [
    ("os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM, ""),  # a scheduler's or `docker stop`'s
    ("os.kill(os.getpid(), signal.SIGINT)", -signal.SIGINT, ""),
    ("os.kill(os.getpid(), signal.SIGKILL)", 137, "transferkit transfer: error: its process was killed by signal 9"),
    ("sys.exit(2)", 2, ""),
    ("sys.exit(143)", -signal.SIGTERM, "")],  # a fit's SIGTERM, said in the child's line: no second line
    ids=["sigterm", "sigint", "kill_9", "refused", "fit_sigterm"])
def test_a_hydra_job_run_as_a_child_command_ends_as_its_child_did(tmp_path, ending, code, stderr):
    """Hydra mode runs a DDP job as `transferkit STAGE --params FILE` in a child process. A child stopped by SIGTERM
    or SIGINT has said so in its own line: the command dies of the same signal, without a second line. One killed
    outright (out of memory, kill -9) is one line from the command, exit 137; a child's refusal keeps its code."""
    import subprocess
    import sys

    child = f"import os, signal, sys\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\n{ending}\n"  # as a stage does
    script = ("import subprocess, sys\nfrom pathlib import Path\n"
              "import transferkit.config.compose as compose\nfrom transferkit import cli\n"
              "compose.params_text = lambda cfg: 'seed: 0\\n'\n"
              "popen = subprocess.Popen  # the child command, as the test's script\n"
              f"subprocess.Popen = lambda argv, **kw: popen([sys.executable, '-c', {child!r}], **kw)\n"
              "cli._run_job_in_subprocess('transfer', None, Path(sys.argv[1]), Path(sys.argv[1]) / 'transfer')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert (proc.stderr.strip().startswith(stderr) and len(proc.stderr.strip().splitlines()) == 1 if stderr
            else proc.stderr == ""), proc.stderr[-2000:]
    if code == 137:  # a Hydra rerun goes to a new folder unless told this one: the fix names it
        assert proc.stderr.strip().endswith(f"Fix: run it again into {tmp_path} (hydra.run.dir; with -m, "
                                            f"hydra.sweep.dir): it resumes there."), proc.stderr[-2000:]


def test_a_hydra_run_its_stage_refuses_is_one_line_with_exit_code_2(tmp_path):
    """An error a stage meets as it runs (here no CIFAR-10 in data_dir, and no download) ends a Hydra-mode run as
    a refusal before it does: one line and exit code 2, not Hydra's wrapper and exit code 1."""
    proc = cli("prepare", "data.download=false", *outside(tmp_path), f"hydra.run.dir={tmp_path / 'run'}")
    line = one_error_line(proc)
    assert "CIFAR10 not found" in line


def test_a_stage_closing_line_is_printed_after_a_library_logged_a_warning_to_the_root():
    """ONNX Runtime's quantizer calls logging.warning(), which gives the root logger a WARNING handler: the closing
    line went to the transferkit logger there, below its level, and quantize with keep_float printed nothing."""
    import subprocess
    import sys

    code = ("import logging\nlogging.warning('a library warns')\nfrom transferkit.stages.common import announce\n"
            "announce('quantize: INT8 top-1 ...')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout == "quantize: INT8 top-1 ...\n", proc.stderr[-2000:]
