"""The command line as users meet it: --help lists what there is, bad input ends in one
`error:` line that names the fix (exit code 2, no traceback), and nothing is overwritten."""

from __future__ import annotations

import pytest

from conftest import ROOT, cli, compose, one_error_line, run
from transferkit.config.compose import params_text


def test_help_lists_stages_experiments_and_overrides():
    out = cli("--help").stdout
    for word in ("prepare", "pretrain", "transfer", "probe", "scratch", "evaluate", "cifar10_split",
                 "seed_aquatic", "smoke", "transfer.freeze_depth", "trainer=ddp", "collect", "check-repro"):
        assert word in out


def test_check_params_passes_on_the_committed_params():
    proc = cli("check-params")
    assert proc.returncode == 0, proc.stderr


def test_unknown_command():
    proc = cli("pretrian")
    assert proc.returncode == 2 and "unknown command 'pretrian'" in proc.stderr


def test_unknown_override_key_via_hydra_mode(tmp_path):
    line = one_error_line(cli("transfer", "experiment=smoke", "transfer.freez_depth=1", cwd=ROOT))
    assert "freez_depth" in line


@pytest.mark.parametrize("override, needle", [
    ("data.target.classes=[cat,dgo,horse]", "unknown class 'dgo'"),
    ("data.target.train_per_class=5000", "class 'cat' has 5000 train images"),
])
def test_bad_data_choices_on_the_real_layout(tmp_path, override, needle):
    # a tiny image-folder archive with the real CIFAR-10 class names
    from conftest import CIFAR10_CLASSES, write_image_folder

    write_image_folder(tmp_path / "data", CIFAR10_CLASSES, train_per_class=5000 // 1000, test_per_class=1)
    cfg = compose(override, tmp=tmp_path)
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    line = one_error_line(cli("prepare", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path))
    assert needle.split(" has ")[0] in line


def test_missing_dataset_through_the_cli_keeps_previous_outputs(tmp_path):
    ok = compose("experiment=smoke", tmp=tmp_path)
    run("prepare", ok)
    before = (tmp_path / "artifacts" / "prepare" / "target.pt").read_bytes()
    cfg = compose("data.download=false", tmp=tmp_path)  # cifar10_split with an empty data/
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    line = one_error_line(cli("prepare", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path))
    assert "CIFAR10 not found" in line and "experiment=smoke" in line
    assert (tmp_path / "artifacts" / "prepare" / "target.pt").read_bytes() == before
