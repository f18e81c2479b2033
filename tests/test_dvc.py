"""The DVC pipeline as users run it: `dvc repro` on the smoke experiment in a fresh copy of
the project, then a second `dvc repro` that does nothing, a clean `dvc status`, and
`dvc metrics show` / `dvc plots show` reading what the stages declared."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, running
from transferkit.project import child_env, copy_project


def _sh(cmd: list[str], cwd: Path, timeout=600) -> str:
    # the environment check-repro gives its commands: this venv's transferkit and dvc first on PATH
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_twice_is_a_no_op_and_status_is_clean(tmp_path, server_dir, one_thread, monkeypatch):
    """The stages run warm (TRANSFERKIT_WARM=1): each of the 15 stage runs would otherwise spend most
    of its time importing torch and Lightning. test_warm finds warm and fresh stages' outputs
    identical, and `.ci/run`'s check-repro runs every stage of this pipeline fresh, twice."""
    monkeypatch.setenv("TRANSFERKIT_WARM", "1")
    # a fresh clone: code and conf/, params.yaml for the smoke experiment, data/ tracked, one commit
    from transferkit.config.compose import compose, params_text

    proj = copy_project(ROOT, tmp_path / "proj", params_text(compose(["experiment=smoke"])))

    first = _sh(["dvc", "repro"], proj)
    from transferkit.stages import STAGES

    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    assert "| transfer (fine-tuned) |" in first and "Transfer minus scratch" in first  # evaluate prints the answer
    assert "transfer (freeze depth 1): top-1 val " in first  # and each training stage its own scores
    assert "quantize: INT8 top-1 test " in first  # and quantize what it made
    second = _sh(["dvc", "repro"], proj)
    assert "Running stage" not in second
    assert "up to date" in _sh(["dvc", "status"], proj)
    with open(proj / "data" / "README.md", "a") as readme:  # documentation beside the data, not data
        readme.write("A note of the user's.\n")
    assert "up to date" in _sh(["dvc", "status"], proj)
    shown = yaml.safe_load((proj / "params.yaml").read_text())
    shown["trainer"].update(progress_bar=True, checkpoint_budget=1)  # how a run looks and saves, not what it writes
    (proj / "params.yaml").write_text(yaml.safe_dump(shown, sort_keys=False))
    assert "up to date" in _sh(["dvc", "status"], proj)

    metrics = _sh(["dvc", "metrics", "show"], proj)
    assert "artifacts/evaluate/metrics.json" in metrics and "models.transfer.top1" in metrics
    _sh(["dvc", "plots", "show", "--out", str(tmp_path / "plots")], proj)
    assert (tmp_path / "plots" / "index.html").exists()

    # a changed parameter reruns only the stages that depend on it
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["evaluate"]["tta"] = "none"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _sh(["dvc", "repro"], proj)
    assert "Running stage 'evaluate'" in third and "Running stage 'pretrain'" not in third
    text = (proj / "params.yaml").read_text().replace("calibration_images: 32", "calibration_images: 24")
    (proj / "params.yaml").write_text(text)
    from transferkit.project import stages_run

    assert stages_run(_sh(["dvc", "repro"], proj)) == ["quantize", "evaluate"]
    # a stage rerun that remakes its files byte for byte (its timing.json differs) reruns only the stages that
    # read the whole folder: the others depend on the files they read
    assert stages_run(_sh(["dvc", "repro", "--force", "--single-item", "pretrain"], proj)) == ["pretrain"]
    assert stages_run(_sh(["dvc", "repro"], proj)) == ["evaluate"]


def test_a_copy_of_the_project_gets_the_dvc_yaml_of_its_own_params(tmp_path):
    """check-repro and the benchmarks copy the project composed as they choose (smoke, say): the copy's
    dvc.yaml is made from those params, never the project's own, which may name other folders or files."""
    from transferkit.config.compose import compose, params_text, to_params
    from transferkit.config.dvcyaml import dvc_yaml_text

    cfg = compose(["experiment=smoke", "paths.artifacts_dir=elsewhere"])
    proj = copy_project(ROOT, tmp_path / "proj", params_text(cfg))
    made = (proj / "dvc.yaml").read_text()
    assert made == dvc_yaml_text(to_params(cfg)) and "elsewhere/prepare" in made
    assert "elsewhere/prepare" not in (ROOT / "dvc.yaml").read_text()
    assert "Running stage" not in _sh(["dvc", "status"], proj)  # a valid pipeline DVC reads
    # as in a clone, `dvc exp run -S key=value` composes conf/ (DVC's Hydra setting), not edits params.yaml
    assert (proj / ".dvc" / "config").read_text() == (ROOT / ".dvc" / "config").read_text()
    assert _sh(["dvc", "config", "hydra.enabled"], proj).strip() == "True"


def test_dvc_yaml_is_generated_from_the_stage_table():
    from transferkit.config.dvcyaml import dvc_yaml_text

    made = dvc_yaml_text(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert (ROOT / "dvc.yaml").read_text() == made, "run `transferkit params` and commit dvc.yaml"
    stages = yaml.safe_load(made)["stages"]  # the trainer's settings that change results, not how a run looks
    assert "trainer.precision" in stages["pretrain"]["params"] and "trainer" not in stages["pretrain"]["params"]
    assert not any(k in stages["pretrain"]["params"] for k in ("trainer.progress_bar", "trainer.checkpoint_budget"))


def test_dvc_files_are_read_as_the_safe_yaml_parser_reads_them_and_as_data_only():
    """dvc.yaml and dvc.lock are read with libyaml's parser where PyYAML has it: the same values as yaml.safe_load
    gives for the project's own files, and a tag that would build a Python object is refused, not run."""
    from transferkit.plain import dvc_file_data

    for name in ("dvc.yaml", "dvc.lock"):
        text = (ROOT / name).read_text()
        assert dvc_file_data(text) == yaml.safe_load(text), name
    with pytest.raises(yaml.YAMLError, match="python/object"):
        dvc_file_data("stages: !!python/object/apply:os.system ['echo ran']\n")


@pytest.mark.parametrize("experiment, pretrain_validates", [("cifar10_split", False), ("smoke", True)])
def test_the_validation_plot_names_only_curves_the_stages_write(experiment, pretrain_validates):
    """The default source task has no val images, so pretrain writes no val/acc.tsv: listed, `dvc plots
    show` fails to load it."""
    from transferkit.config.compose import compose, to_params
    from transferkit.config.dvcyaml import dvc_yaml

    plots = dvc_yaml(to_params(compose([f"experiment={experiment}"])))["plots"]
    curves = next(plot["Validation accuracy"]["y"] for plot in plots if "Validation accuracy" in plot)
    assert any("/pretrain/" in path for path in curves) == pretrain_validates
    assert any("/transfer/" in path for path in curves)
    # the curves are dvclive's files: with trainer.loggers=[csv] they were listed, and `dvc plots show` failed
    for loggers, listed in (("[csv]", False), ("[]", False), ("null", False), ("[csv,dvclive]", True)):
        plots = dvc_yaml(to_params(compose([f"experiment={experiment}", f"trainer.loggers={loggers}"])))["plots"]
        assert any("dvclive" in json.dumps(plot) for plot in plots) == listed, loggers


def test_every_stage_depends_on_the_code_it_imports():
    """dvc.yaml's deps come from an import walk: an edit to anything a stage imports reruns it."""
    import yaml

    from transferkit.config.dvcyaml import NEUTRAL, RUNNER, imported_files
    from transferkit.stages import PIPELINE, module_of

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in PIPELINE:
        deps = {d.removeprefix("src/transferkit/") for d in stages[stage.name]["deps"] if d.startswith("src/")}
        runner = set() if stage.command else imported_files(RUNNER)  # validation, seeding, staged output
        assert (imported_files(module_of(stage.name)) | runner) - NEUTRAL == deps, stage.name
        assert ("stages/run.py" in deps) == (not stage.command), stage.name
    assert "training/trainer.py" in imported_files("transferkit.stages.pretrain")  # the walk reaches far
    assert "prune/structured.py" in imported_files("transferkit.stages.prune")


def test_stage_modules_read_only_the_inputs_the_table_declares():
    """No stage module computes another stage's folder: each reads inputs[NAME] for the NAMEs its
    table entry lists, and every declared input is read (by it or the stages it reuses)."""
    import ast
    import importlib

    from transferkit.stages import BY_NAME, PIPELINE, STAGES, module_of

    src = ROOT / "src" / "transferkit"
    for stage in PIPELINE:
        if stage.command:  # a tool with its own command line (export): paths come from dvc.yaml's cmd
            assert all(f"{{{name}}}" in stage.command for name in stage.reads), stage.name
            continue
        text = (src / "stages" / f"{stage.name}.py").read_text()
        used = {node.slice.value for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "inputs"
                and isinstance(node.slice, ast.Constant)}
        reused = [a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)
                  and n.module == "transferkit.stages" for a in n.names if a.name in STAGES]
        for other in reused:  # freeze_curve runs transfer.run: transfer's reads are its reads
            used |= set(BY_NAME[other].reads)
        assert used == set(stage.reads) or (used <= set(stage.reads) and stage.name == "evaluate"), stage.name
        assert "artifacts_dir" not in text and "stage_dir" not in text, stage.name
        assert callable(getattr(importlib.import_module(module_of(stage.name)), "run", None))


@pytest.mark.slow
def test_each_stage_runs_on_only_the_files_its_table_entry_declares(smoke_artifacts, tmp_path):
    """dvc.yaml makes a stage depend on the files it declares (STAGE/FILE), not on whole folders, so a rerun
    upstream that remakes them byte for byte reruns nothing downstream: a file a stage reads undeclared would
    leave it stale. Each stage runs here on input folders that hold only what it declares."""
    from transferkit import cli
    from transferkit.stages import BY_NAME, PIPELINE
    from transferkit.stages.run import run_stage

    cfg, _ = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    for stage in PIPELINE:
        if not stage.reads or stage.reads == stage.uses:  # prepare reads data/; evaluate whole folders
            continue
        views = {name: tmp_path / stage.name / name for name in stage.reads}
        for use in stage.uses:
            name, _, file = use.partition("/")
            views[name].mkdir(parents=True, exist_ok=True)
            (views[name] / file).symlink_to(artifacts / name / file)
        out = tmp_path / stage.name / "out"
        if BY_NAME[stage.name].command:
            argv = stage.command.format(out=out, **views).split()
            assert cli.main([*argv[1:], "--repeats", "1"]) == 0, stage.name
        else:
            run_stage(stage.name, cfg, out, views)
        assert (out / "params.yaml").is_file() or (out / "export.json").is_file(), stage.name


def test_a_dataset_read_from_outside_data_dir_is_a_dep_of_prepare(tmp_path, monkeypatch):
    """data.target.dataset=PATH reads a folder or archive wherever it is. Inside data/ (or by name) the
    `data` dep covers it; anywhere else it is a dep of its own, or `dvc repro` would keep the images
    prepare made from its old contents."""
    from conftest import write_image_folder
    from transferkit.config.compose import compose, params_text, to_params
    from transferkit.stages import named_files

    archive = write_image_folder(tmp_path / "mine", ["cat", "dog"], 3, 2)
    split = ["data.target.classes=[cat,dog]", "data.target.train_per_class=2", "data.target.val_per_class=1",
             "quantize.calibration_images=4"]  # a valid pipeline: under DVC, prepare checks every stage's settings
    cfg = compose(["experiment=smoke", f"data.target.dataset={archive}", *split])
    assert named_files("prepare", to_params(cfg)) == {"data.target.dataset": str(archive)}
    (tmp_path / "data").mkdir()
    shutil.copy(archive, tmp_path / "data" / "in_data.tar.gz")
    (tmp_path / "data" / "linked.tar.gz").symlink_to(archive)  # a link in data/ to a file elsewhere: data/'s
    (tmp_path / "data" / "cifar10-jpeg.tar.gz").symlink_to(archive)  # as the README's offline setup makes it
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the project's folder, not the current one, is what relative paths mean
    for name in ("cifar10", "synthetic", "in_data.tar.gz", "data/in_data.tar.gz", tmp_path / "data" / "in_data.tar.gz",
                 "linked.tar.gz", "data/linked.tar.gz", "missing.tar.gz"):  # by name, or in data/: data's dep
        other = compose(["experiment=smoke", f"data.target.dataset={name}"], ROOT / "conf")
        assert named_files("prepare", to_params(other), tmp_path) == {}, name
    shutil.copy(archive, tmp_path / "beside.tar.gz")  # in the project, outside data/: a dep as given
    other = compose(["experiment=smoke", "data.target.dataset=beside.tar.gz"], ROOT / "conf")
    assert named_files("prepare", to_params(other), tmp_path) == {"data.target.dataset": "beside.tar.gz"}

    proj = copy_project(ROOT, tmp_path / "proj", params_text(cfg))
    assert str(archive) in yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]
    _sh(["dvc", "repro", "prepare"], proj)
    assert "up to date" in _sh(["dvc", "status", "prepare"], proj)
    write_image_folder(tmp_path / "mine", ["cat", "dog"], 4, 2)  # the archive made again, with more images
    assert "modified:" in _sh(["dvc", "status", "prepare"], proj)
    assert "Running stage 'prepare'" in _sh(["dvc", "repro", "prepare"], proj)


def test_a_file_a_setting_names_must_be_a_dep_of_the_stage_dvc_runs(tmp_path, monkeypatch):
    """`dvc exp run -S distill.student_init=init.pt` writes params.yaml, not dvc.yaml: the stage DVC runs
    (DVC_STAGE, DVC_ROOT) would not depend on the file, and would not run again when it changes."""
    from transferkit.config.dvcyaml import dvc_yaml_text
    from transferkit.errors import TransferkitError
    from transferkit.stages.run import check_files_tracked
    from transferkit.config.compose import compose, to_params

    tracked = compose(["experiment=smoke", "distill.student_init=init.pt"])
    (tmp_path / "dvc.yaml").write_text(dvc_yaml_text(to_params(tracked)))  # as `transferkit params` writes it
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "distill")
    check_files_tracked("distill", tracked)
    check_files_tracked("distill", compose(["experiment=smoke"]))  # no file named: nothing to track
    untracked = compose(["experiment=smoke", "distill.student_init=other.pt"])
    with pytest.raises(TransferkitError, match=r"distill.student_init=other.pt names a file that is not among the deps "
                                               r"of distill in .*Fix: set it with `transferkit params`"):
        check_files_tracked("distill", untracked)
    monkeypatch.setenv("DVC_STAGE", "student")
    with pytest.raises(TransferkitError, match="not among the deps of student"):
        check_files_tracked("student", untracked)
    monkeypatch.delenv("DVC_STAGE")  # run by hand, not by DVC: nothing to check
    check_files_tracked("distill", untracked)


@pytest.mark.parametrize("stage, setting", [("transfer", "paths.artifacts_dir=elsewhere"),
                                            ("prepare", "paths.data_dir=other_data")])
def test_folders_set_without_transferkit_params_are_refused_under_dvc(tmp_path, monkeypatch, stage, setting):
    """`dvc exp run -S paths.artifacts_dir=elsewhere` leaves dvc.yaml tracking artifacts/: the stage would write
    elsewhere while DVC locked artifacts/STAGE's earlier outputs against the new params."""
    from transferkit.config.compose import compose, to_params
    from transferkit.config.dvcyaml import dvc_yaml_text
    from transferkit.errors import TransferkitError
    from transferkit.stages.run import check_files_tracked

    (tmp_path / "dvc.yaml").write_text(dvc_yaml_text(to_params(compose(["experiment=smoke"]))))
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", stage)
    check_files_tracked(stage, compose(["experiment=smoke"]))
    with pytest.raises(TransferkitError, match=rf"{setting} is not where {stage}'s entry in .*dvc.yaml has DVC track "
                                               rf"it.*Fix: set it with `transferkit params`"):
        check_files_tracked(stage, compose(["experiment=smoke", setting]))


def test_a_copy_of_the_project_ignores_the_users_git_hooks_and_commits_no_data(tmp_path, monkeypatch):
    """A failing (or file-editing) global hook must not break or change the copy check-repro tests, and
    data/ stays out of the copy's git, as in a clone."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    for item in ("conf", "src", ".dvcignore", ".gitignore", ".dvc"):
        (root / item).symlink_to(ROOT / item)
    (root / "data" / "images.tar.gz").write_bytes(b"not code, not for git")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pre-commit").write_text("#!/bin/sh\necho hook ran >&2\nexit 1\n")
    (hooks / "pre-commit").chmod(0o755)
    (tmp_path / "gitconfig").write_text(f"[core]\n\thooksPath = {hooks}\n[init]\n\ttemplateDir = {tmp_path}/tpl\n")
    shutil.copytree(hooks, tmp_path / "tpl" / "hooks")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    proj = copy_project(root, tmp_path / "proj", (ROOT / "params.yaml").read_text())
    assert (proj / "data" / "images.tar.gz").read_bytes() == b"not code, not for git"
    from transferkit.project import run  # what check-repro and the benchmarks run there: the copy's code

    assert run(["python", "-c", "import transferkit; print(transferkit.__file__)"], proj).strip() == str(
        proj.resolve() / "src" / "transferkit" / "__init__.py")
    assert "data/images.tar.gz" not in _sh(["git", "ls-files"], proj)
    assert not list((proj / ".git" / "hooks").glob("*"))


def _started_stage(pidfile: Path, caller: subprocess.Popen) -> int:
    """The pid the stage `caller` runs writes to `pidfile`, once it has (within 60 s, the caller still running)."""
    import time

    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline and caller.poll() is None
        time.sleep(0.05)
    return int(pidfile.read_text())


@pytest.mark.parametrize("handler", ["check-repro's", "none (a sweep's)"])
def test_stopping_a_dvc_run_ends_the_stage_it_started(tmp_path, handler):
    """check-repro turns SIGTERM into an exit, and a sweep has no handler at all (`timeout`, `kill`): the
    process dvc started (here a shell's child) must end with it, not go on training into a folder being
    deleted or holding DVC's lock."""
    import os
    import signal
    import sys

    pidfile = tmp_path / "pid"
    script = ("import signal, sys\nfrom pathlib import Path\nfrom transferkit.project import run\n"
              + ("signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))\n" if handler.startswith("check")
                 else "") + f"run(['sh', '-c', 'sleep 60 & echo $! > {pidfile}; wait'], Path('.'))\n")
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    sleeper = _started_stage(pidfile, caller)
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=30) == 128 + signal.SIGTERM
    try:
        assert not running(sleeper)
    finally:
        if running(sleeper):
            os.kill(sleeper, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a parent's end reaches a child through prctl")
def test_a_sweep_killed_by_sigkill_takes_its_dvc_and_the_stage_with_it(tmp_path):
    """A sweep killed by SIGKILL (kill -9, the out-of-memory killer) has no handler to stop the dvc it started in a
    session of its own: dvc and its stage trained on, holding DVC's lock. dvc (here a shell that waits on the stage)
    has a SIGTERM at its caller's end, and a stage (cli.py) one at dvc's."""
    import os
    import signal

    pidfile = tmp_path / "pid"
    (tmp_path / "stage.py").write_text("import os, time\nfrom transferkit.errors import end_with_parent\n"
                                       f"end_with_parent()\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                                       "time.sleep(60)\n")
    script = ("from pathlib import Path\nfrom transferkit.project import run\n"
              f"run(['sh', '-c', '{sys.executable} stage.py; true'], Path('.'))\n")
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    stage = _started_stage(pidfile, caller)
    caller.kill()
    caller.wait()
    try:
        deadline = time.monotonic() + 30
        while running(stage) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(stage)
    finally:
        if running(stage):
            os.kill(stage, signal.SIGKILL)


def test_a_stage_that_does_not_end_on_sigterm_is_killed_when_the_grace_period_ends():
    """stop_session sends SIGKILL to what is left of the session once `grace_s` has passed: a stage that ignores
    SIGTERM ends all the same, and its caller is not left waiting on it."""
    import os
    import signal
    import threading

    from transferkit.project import stop_session

    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"  # SIGTERM is ignored from here on
        stopper = threading.Thread(target=stop_session, args=(proc, signal.SIGTERM, 0.5), daemon=True)
        stopper.start()
        stopper.join(timeout=60)
        assert not stopper.is_alive() and proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_the_readme_draws_and_lists_every_stage():
    """The README's stage table had no row for `student`, a stage of the graph above it."""
    from transferkit.stages import STAGES

    section = (ROOT / "README.md").read_text().split("## The stage graph")[1].split("\n## ")[0]
    graph = section.split("```")[1]
    rows = {name.strip() for line in section.splitlines() if line.startswith("| ")
            for name in line.split("|")[1].split(",")}
    assert [s for s in STAGES if s not in graph] == [] and [s for s in STAGES if s not in rows] == []


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="git decides against a checkout")
def test_git_ignores_what_runs_leave_and_tracks_the_project():
    """Run outputs, Hydra's folders under any folder, and a killed run's lock or work folder beside its output
    (scenarios/ sits in the root) stay out of `git add -A`; the project's own files do not."""
    ignored = ["artifacts/x", "sweeps/x", "scenarios/x", "docs/outputs/x", "multirun/x", ".scenarios.lock",
               "sweeps/.smoke-transfer.lock", "mine/.out.incomplete/x", "mine/.out.old/x",
               "data/cifar10-jpeg.tar.gz"]
    kept = ["dvc.lock", "dvc.yaml", "params.yaml", "data/README.md", "src/transferkit/cli.py", "conf/config.yaml"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *ignored, *kept], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.stdout.split() == ignored


def test_a_second_ctrl_c_does_not_leave_the_stage_running(tmp_path):
    """`uv run` passes a Ctrl+C on to the command, which then meets a second SIGINT while it waits for the stages
    dvc started to end: the wait went with it, and the command exited with the stage still running."""
    import os
    import signal
    import sys
    import time

    pidfile = tmp_path / "pid"
    stage = f"trap 'sleep 2; exit 130' INT; echo $$ > {pidfile}; while :; do sleep 0.1; done"
    script = f"from pathlib import Path\nfrom transferkit.project import run\nrun(['sh', '-c', {stage!r}], Path('.'))\n"
    # SIGINT as a terminal's command has it: a shell's background job (CI's) starts with it ignored
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid = None
    try:
        pid = _started_stage(pidfile, caller)
        caller.send_signal(signal.SIGINT)
        time.sleep(0.5)  # the stage is ending (2 s) when the second one comes
        caller.send_signal(signal.SIGINT)
        caller.wait(timeout=60)
        assert not running(pid)
    finally:  # a failure leaves neither process behind
        for left in (caller.pid, pid):
            with __import__("contextlib").suppress(ProcessLookupError, TypeError):
                os.kill(left, signal.SIGKILL)


@__import__("contextlib").contextmanager
def _dvc_repro_running(tmp_path, repo, held_by: str):
    """A process named dvc running `repro -s evaluate` (its pid yielded), named by repo/.dvc/tmp/`held_by`."""
    import sys
    import time

    (repo / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / "dvc").write_text("import time\ntime.sleep(60)\n")  # as a venv's dvc: python .../bin/dvc repro
    proc = subprocess.Popen([sys.executable, str(tmp_path / "dvc"), "repro", "-s", "evaluate"])
    try:
        for _ in range(100):  # the new process's command line, which /proc gives once exec has finished
            if b"repro" in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        (repo / ".dvc" / "tmp" / "lock").write_text(f" {proc.pid}\n" if held_by == "lock" else " 1\n")
        if held_by == "rwlock":
            (repo / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(
                {"write": {str(repo / "artifacts" / "evaluate"): {"pid": proc.pid, "cmd": "dvc repro"}}}))
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads a process's command line from /proc")
@pytest.mark.parametrize("held_by", ["lock", "rwlock"])
def test_params_are_not_written_while_dvc_repro_runs(tmp_path, held_by):
    """`transferkit params` mid-`dvc repro`: DVC recorded the new params.yaml in dvc.lock for a stage that had run
    with the old, and called it up to date. DVC holds its repository lock between stages, and writes the outputs a
    stage's command is making into .dvc/tmp/rwlock while it runs."""
    import os

    from transferkit.errors import TransferkitError
    from transferkit.project import refuse_while_dvc_runs

    with _dvc_repro_running(tmp_path, tmp_path, held_by) as pid:
        with pytest.raises(TransferkitError, match=rf"^`dvc repro -s evaluate` is running in {tmp_path} \(process "
                                                   rf"{pid}\): a params.yaml written now .* Fix: wait for it to "
                                                   rf"end \(or stop it\), then write params.yaml\.$"):
            refuse_while_dvc_runs(tmp_path)
    refuse_while_dvc_runs(tmp_path)  # the pid it names has ended: no run
    (tmp_path / ".dvc" / "tmp" / "lock").write_text(f" {os.getpid()}\n")  # a live process, not dvc's
    refuse_while_dvc_runs(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads a process's command line from /proc")
def test_a_runs_folder_whose_dvc_repro_still_runs_is_neither_run_nor_collected(tmp_path):
    """A sweep killed by SIGKILL leaves its `dvc repro` running (in a session of its own) and frees its own lock:
    the same sweep again, and collect, got DVC's error, which offers to delete DVC's lock from under that run."""
    from transferkit.errors import TransferkitError
    from transferkit.project import run_pipeline, stale_stages

    runs = tmp_path / "runs"
    with _dvc_repro_running(tmp_path, runs, "rwlock") as pid:
        with pytest.raises(TransferkitError, match=rf"^`dvc repro -s evaluate` is running in {runs} \(process {pid}\), "
                                                   rf"left by an earlier run of this folder stopped by force, .* Fix: "
                                                   rf"wait for it to end, or stop it \(`kill {pid}`\), then run the "
                                                   rf"command again\.$"):
            run_pipeline(runs, {"point0": {"cmd": "true", "deps": [], "outs": ["point0"]}})
        assert not (runs / "dvc.yaml").exists()
        with pytest.raises(TransferkitError, match=rf"^`dvc repro -s evaluate` is running in {runs} \(process {pid}\), "
                                                   rf"making its runs\. Fix: wait for it to end \(or stop it\), then "
                                                   rf"collect\.$"):
            stale_stages(runs)
