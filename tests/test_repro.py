"""`transferkit check-repro`: it passes on this project, and it can fail: on nondeterminism
injected from outside the code (no test hook in transferkit) and on params.yaml drifting
from conf/. The runs use `--target pretrain` (prepare + pretrain of the smoke experiment)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import ROOT
from transferkit.config.compose import compose, params_text
from transferkit.reproducibility.check import describe_difference, main, weights_difference

# Imported by every Python process started with its folder on PYTHONPATH (dvc, the stages).
# When a process imports torch, torch.manual_seed is replaced by one that ignores the seed it
# is given, so every stage starts from a different random state. Hooking the import instead
# of importing torch here keeps dvc and git-side processes free of the cost.
UNSEEDED_TORCH = textwrap.dedent('''
    import importlib.machinery
    import os
    import sys


    class _SeedFromUrandom:
        def find_spec(self, name, path=None, target=None):
            if name != "torch":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            exec_module = spec.loader.exec_module

            def exec_and_unseed(module):
                exec_module(module)
                seeded = module.manual_seed
                module.manual_seed = lambda _seed: seeded(int.from_bytes(os.urandom(4), "little"))

            spec.loader.exec_module = exec_and_unseed
            return spec


    sys.meta_path.insert(0, _SeedFromUrandom())
''')


def _check_repro(*args: str, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transferkit.reproducibility.check", *args], cwd=cwd,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


@pytest.mark.slow
def test_check_repro_passes_on_the_project(monkeypatch, one_thread, capsys):
    monkeypatch.chdir(ROOT)
    code = main(["--target", "pretrain"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out
    assert "PASS  artifacts/pretrain/metrics.json is identical in both runs" in out
    assert "PASS  artifacts/pretrain/model.pt is identical in both runs" in out  # weights, bit for bit
    assert "PASS  artifacts/prepare/source.pt is identical in both runs" in out  # the data every stage reads
    assert "both runs compose experiment=smoke" in out
    assert "check-repro: reproducible" in out


@pytest.mark.slow
def test_check_repro_fails_when_seeding_is_not_deterministic(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(UNSEEDED_TORCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # as one_thread, as every test trains
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}

    proc = _check_repro("--target", "pretrain", env=env)

    assert proc.returncode == 1, proc.stdout
    # the losses are floats, so dvclive's metrics.json differs whatever the accuracies do
    assert re.search(r"FAIL  artifacts/pretrain/(dvclive/)?metrics\.json differs between the two runs",
                     proc.stdout), proc.stdout
    assert "in run 1" in proc.stdout and "in run 2" in proc.stdout  # the differing keys and values
    assert "FAIL  artifacts/pretrain/model.pt differs between the two runs" in proc.stdout
    assert "max |difference|" in proc.stdout  # which tensors drifted, and how far
    assert "check-repro: FAILED" in proc.stdout


def test_check_repro_fails_on_params_drift_before_any_run(tmp_path, monkeypatch, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(ROOT / "conf", proj / "conf")
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    params = yaml.safe_load(params_text(compose(["experiment=smoke"], proj / "conf")))
    params["pretrain"]["epochs"] += 1  # edited by hand instead of in conf/
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(proj)

    code = main(["--target", "pretrain"])

    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL  params.yaml and dvc.yaml differ from what they are made from" in out
    assert "params.yaml differs from conf/: pretrain.epochs: params.yaml has 5, conf/ composes 4" in out
    assert "transferkit params" in out  # the fix
    assert "dvc repro" not in out  # stopped before any run
    assert "check-repro: FAILED (0/1 checks passed)" in out


def test_check_repro_refuses_bad_input_before_copying_anything(tmp_path, capsys):
    from transferkit import cli

    assert cli.main(["check-repro", "--target", "pretrian"]) == 2  # argparse names the stages
    assert "invalid choice: 'pretrian'" in capsys.readouterr().err
    (tmp_path / "run1").mkdir()
    for argv, needle in ((["--experiment", "smok"], "smok"), (["--keep", str(tmp_path)], "run1 or run2 already")):
        assert cli.main(["check-repro", *argv]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(errors) == 1 and needle in errors[0], errors


def test_the_module_run_by_itself_refuses_bad_input_in_one_line_too():
    """`python -m transferkit.reproducibility.check --target nope` ended in a TransferkitError traceback."""
    for args, needle in ((["--target", "nope"], "invalid choice: 'nope'"), (["--experiment", "smok"], "smok")):
        proc = _check_repro(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
        assert proc.stdout.count("error:") == 1 and needle in proc.stdout, proc.stdout[-2000:]


def test_a_keep_folder_that_cannot_hold_the_runs_is_refused_before_anything_is_copied(tmp_path, capsys):
    """A file on its path, or a folder each run copies (data/, src/, conf/): the copy copied itself until Python's
    recursion limit, and left a hundred megabytes in data/."""
    from transferkit import cli

    import shutil

    (tmp_path / "file").write_text("a file, not a folder")
    keeps = ((tmp_path / "file" / "runs", f"{tmp_path / 'file'} is a file, not a folder"),
             (ROOT / "data" / "rk", f"is inside {ROOT / 'data'}, which each run copies"),
             (ROOT / "src" / "transferkit" / "rk", f"is inside {ROOT / 'src'}"),
             # two copies of the project in what DVC tracks and replaces
             (ROOT / "artifacts" / "prepare" / "rk", f"lies in {ROOT / 'artifacts' / 'prepare'}, the prepare stage's"))
    assert not any(keep.exists() for keep, _ in keeps)
    try:
        for keep, needle in keeps:
            assert cli.main(["check-repro", "--keep", str(keep)]) == 2
            errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
            assert len(errors) == 1 and needle in errors[0] and "Fix: " in errors[0], errors
            assert not keep.exists()
    finally:  # where a refusal breaks, the copies it made go with it, not left in the checkout for other tests
        for keep, _ in keeps:
            shutil.rmtree(keep, ignore_errors=True)


def test_prepares_outputs_are_compared_and_a_difference_names_the_tensor(tmp_path, capsys):
    """`--target prepare` failed with nothing to compare although its files were identical."""
    import torch

    from transferkit.reproducibility.check import Report, compare_outputs

    runs = [tmp_path / "run1", tmp_path / "run2"]
    for i, run in enumerate(runs):
        (run / "artifacts" / "prepare").mkdir(parents=True)
        (run / "artifacts" / "prepare" / "summary.json").write_text('{"source": {"n_train": 4}}')
        for role in ("source", "target"):
            images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
            images[0, 0, 0, 0] += i * (role == "target")  # one pixel of run 2's target differs
            torch.save({"train_x": images, "classes": ["a", "b"]}, run / "artifacts" / "prepare" / f"{role}.pt")
    report = Report()
    compare_outputs(*runs, report)
    out = capsys.readouterr().out
    assert "PASS  artifacts/prepare/source.pt is identical in both runs" in out, out
    assert "PASS  artifacts/prepare/summary.json is identical in both runs" in out, out
    assert "FAIL  artifacts/prepare/target.pt differs between the two runs" in out, out
    assert "train_x: max |difference| 1" in out and (report.passed, report.failed) == (3, 1), out


def test_a_metrics_difference_names_the_keys_and_both_values():
    a = b'{"models": {"transfer": {"top1": 0.5, "top5": 0.9}}, "n": 10}'
    b = b'{"models": {"transfer": {"top1": 0.625, "top5": 0.9}}, "n": 10}'
    assert describe_difference(a, b) == "models.transfer.top1: 0.5 in run 1, 0.625 in run 2"
    assert "key order" in describe_difference(b'{"a": 1, "b": 2}', b'{"b": 2, "a": 1}')
    # a list's items are named by index: the value that drifted, not the whole list
    assert describe_difference(b'{"per_class": [0.5, 0.7]}', b'{"per_class": [0.5, 0.8]}') == \
        "per_class.1: 0.7 in run 1, 0.8 in run 2"


def test_an_output_only_one_run_made_fails_the_comparison(tmp_path, capsys):
    """A file of a compared name that one run made and the other did not is a difference, whichever run lacks it."""
    from transferkit.reproducibility.check import Report, compare_outputs

    runs = [tmp_path / "run1", tmp_path / "run2"]
    for run in runs:
        (run / "artifacts" / "pretrain").mkdir(parents=True)
        (run / "artifacts" / "pretrain" / "metrics.json").write_text('{"val_acc": 0.5}')
    for run, stage in zip(runs, ("probe", "transfer")):
        (run / "artifacts" / stage).mkdir()
        (run / "artifacts" / stage / "metrics.json").write_text('{"val_acc": 0.5}')
    report = Report()
    compare_outputs(*runs, report)
    out = capsys.readouterr().out
    assert "FAIL  artifacts/probe/metrics.json exists only in run 1" in out, out
    assert "FAIL  artifacts/transfer/metrics.json exists only in run 2" in out, out
    assert (report.passed, report.failed) == (2, 2), out  # something to compare; pretrain's identical
    assert report.summary() == 1


def test_runs_that_made_no_file_to_compare_fail_the_comparison(tmp_path, capsys):
    """A --target whose stages write none of the compared files is no evidence of reproducibility: it fails, with
    the fix, rather than pass with nothing compared."""
    from transferkit.reproducibility.check import Report, compare_outputs

    runs = [tmp_path / "run1", tmp_path / "run2"]
    for run in runs:
        (run / "artifacts" / "pretrain").mkdir(parents=True)
        (run / "artifacts" / "pretrain" / "notes.txt").write_text("no file check-repro compares")
    report = Report()
    compare_outputs(*runs, report)
    out = capsys.readouterr().out
    assert out.startswith("FAIL  outputs under artifacts/ to compare (metrics.json, model.pt") and \
        "Fix: choose a --target that makes some (e.g. pretrain)" in out, out
    assert (report.passed, report.failed) == (0, 1)


@pytest.mark.parametrize("second, status, failed", [
    ("", "Data and pipelines are up to date.\n", []),
    ("Running stage 'pretrain':\n", "Data and pipelines are up to date.\n",
     ["a second dvc repro pretrain ran pretrain"]),
    ("", "pretrain:\n\tchanged outs:\n\t\tmodified: artifacts/pretrain\n", ["dvc status is not up to date"]),
])
def test_a_copy_whose_second_repro_runs_a_stage_or_whose_status_is_not_clean_fails(tmp_path, monkeypatch, capsys,
                                                                                  second, status, failed):
    """The promise checked in each copy: the second `dvc repro` runs nothing and `dvc status` then reports nothing
    to do; dvc's own reports (here given as dvc prints them) decide each check."""
    from transferkit.reproducibility import check

    replies = iter(["Running stage 'prepare':\nRunning stage 'pretrain':\n", second, status])
    monkeypatch.setattr(check, "run", lambda cmd, cwd: next(replies))
    report = check.Report()
    check.reproduce(tmp_path, "pretrain", "run 1", report)
    fails = [line.removeprefix("FAIL  run 1: ") for line in capsys.readouterr().out.splitlines()
             if line.startswith("FAIL")]
    assert fails == failed and (report.passed, report.failed) == (3 - len(failed), len(failed))


def test_a_weights_difference_names_the_tensors_and_how_far_they_drifted(tmp_path):
    import torch

    from transferkit.io import save_torch

    state = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
    save_torch({"state_dict": state}, tmp_path / "a.pt")
    save_torch({"state_dict": {**state, "fc.bias": torch.tensor([0.0, 0.25])}}, tmp_path / "b.pt")
    save_torch({"state_dict": state, "stage": "other"}, tmp_path / "c.pt")
    assert weights_difference(tmp_path / "a.pt", tmp_path / "b.pt") == "fc.bias: max |difference| 0.25"
    assert "same tensors" in weights_difference(tmp_path / "a.pt", tmp_path / "c.pt")


def test_an_onnx_or_torchscript_difference_names_the_weights_or_members_not_two_equal_sizes(tmp_path):
    """A differing model.onnx was described by its size in both runs, which one graph keeps (walk I84): the
    weights that differ are named, as model.pt's are; a TorchScript archive's members, without loading (running)
    it."""
    import zipfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from transferkit.reproducibility.check import onnx_difference, zip_difference

    def graph(bias, doc=""):
        node = helper.make_node("Add", ["x", "bias"], ["y"])
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array(bias, dtype=np.float32), "bias")])
        return helper.make_model(g, doc_string=doc)

    for name, model in (("a", graph([0, 0])), ("b", graph([0, 0.25])), ("c", graph([0, 0], doc="x"))):
        onnx.save(model, tmp_path / f"{name}.onnx")
    assert onnx_difference(tmp_path / "a.onnx", tmp_path / "b.onnx") == "bias: max |difference| 0.25"
    assert onnx_difference(tmp_path / "a.onnx", tmp_path / "c.onnx") == "same weights, another graph or metadata"
    assert onnx_difference(tmp_path / "a.onnx", tmp_path / "missing.onnx").startswith("cannot compare the graphs")
    for name, data in (("a", b"1234"), ("b", b"1235")):
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
            z.writestr("model/code.py", "same")
            z.writestr("model/data/0", data)
    assert zip_difference(tmp_path / "a.zip", tmp_path / "b.zip") == \
        "model/data/0: differs (4 bytes in run 1, 4 in run 2)"
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.writestr("model/code.py", "same")
    assert zip_difference(tmp_path / "a.zip", tmp_path / "c.zip") == "model/data/0: missing in run 2"
    assert zip_difference(tmp_path / "a.zip", tmp_path / "a.onnx").startswith("cannot compare the archives")


def test_the_same_checkpoint_saved_twice_is_byte_identical(tmp_path):
    """save_torch goes through a randomly named temporary file: its name must not reach the
    bytes, or DVC and check-repro would see new weights on every run."""
    import torch

    from transferkit.io import save_torch

    obj = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}}
    save_torch(obj, tmp_path / "a" / "model.pt")
    save_torch(obj, tmp_path / "b" / "model.pt")
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("elsewhere", ["build/artifacts", "ABSOLUTE"])
def test_check_repro_compares_the_outputs_where_paths_artifacts_dir_puts_them(elsewhere, tmp_path, monkeypatch,
                                                                              one_thread, capsys):
    """An experiment's own paths.artifacts_dir: a relative one failed with "choose a --target", as only artifacts/
    was searched; an absolute one, shared by both runs and outside either copy, made DVC exit with code 255."""
    proj = tmp_path / "proj"
    for item in ("conf", "src"):
        shutil.copytree(ROOT / item, proj / item, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, proj / name)
    artifacts = str(tmp_path / "shared") if elsewhere == "ABSOLUTE" else elsewhere
    smoke = (proj / "conf" / "experiment" / "smoke.yaml").read_text()
    (proj / "conf" / "experiment" / "elsewhere.yaml").write_text(f"{smoke}\npaths:\n  artifacts_dir: {artifacts}\n")
    monkeypatch.chdir(proj)

    code = main(["--target", "prepare", "--experiment", "elsewhere"])

    out = capsys.readouterr().out
    assert code == 0, out
    compared = "artifacts" if elsewhere == "ABSOLUTE" else elsewhere
    assert f"PASS  {compared}/prepare/source.pt is identical in both runs" in out, out
    assert (f"paths.artifacts_dir={artifacts} lies outside the project" in out) == (elsewhere == "ABSOLUTE"), out
    assert not (tmp_path / "shared").exists()
