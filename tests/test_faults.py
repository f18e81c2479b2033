"""Faults survived: `kill -9` at a random moment of a training stage, then a rerun, gives
metrics identical to an uninterrupted run, and the previous outputs stay readable the whole
time (a stage builds its folder aside and swaps it in only on success).

By default one random kill of pretrain (the classifier module), of distill (the distiller)
and of quantize's quantization-aware fine-tuning, to keep the suite short;
`KILL_STAGES=all KILL_TRIALS=5 uv run pytest tests/test_faults.py` runs the issue's bar: 5
random kills of every training stage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose, running
from transferkit.config.compose import params_text
from transferkit.training.trainer import resume_folder

TRAIN_STAGES = ("pretrain", "transfer", "probe", "scratch", "freeze_curve", "student", "distill", "prune")
STAGES = TRAIN_STAGES if os.environ.get("KILL_STAGES") == "all" else ("pretrain", "distill")
TRIALS = int(os.environ.get("KILL_TRIALS", "1"))


def _start(stage: str, params: Path, cwd: Path, entry: tuple[str, ...] = ("-m", "transferkit.cli"),
           **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *entry, stage, "--params", str(params)],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _metrics(files: dict[Path, bytes]) -> dict[Path, bytes]:
    """Every metrics.json and model.pt of a stage's output: its own, dvclive's, and one per
    point of freeze_curve (depthK/; it has none at the top). timing.json holds measured
    seconds and the logs hold wall times: those differ from run to run."""
    return {path: data for path, data in files.items() if path.name in ("metrics.json", "model.pt")}


def _appeared(folder: Path, pattern: str) -> bool:
    """Whether anything under folder matches pattern; the stage renames and deletes folders while
    the glob walks them, so a folder that vanishes mid-walk means "not yet", never an error."""
    try:
        return next(folder.glob(pattern), None) is not None
    except FileNotFoundError:
        return False


def _kill_mid_training(stage: str, params: Path, cwd: Path, rng: random.Random,
                       previous: dict[Path, bytes], reference_metrics: dict[Path, bytes],
                       wait_for: str = "**/dvclive", start=_start, results=_metrics) -> float:
    """Start the stage, wait until it trains (its side folder has Lightning's logs), then
    kill -9 after a random delay. Returns the delay once a kill landed before the stage
    swapped its new outputs in; a stage that won the race (it may still be alive, tearing
    down, when the kill lands) must have left a complete new output, and is retried earlier."""
    work = cwd / "artifacts" / f".{stage}.incomplete"
    out = cwd / "artifacts" / stage
    delay = rng.uniform(0.0, 2.0)
    for _ in range(6):
        proc = start(stage, params, cwd)
        deadline = time.monotonic() + 120
        # dvclive/ appears when Lightning starts (freeze_curve: depthK/dvclive/, one per point)
        while not _appeared(work, wait_for) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"{stage} failed on its own: {proc.stderr.read()[-2000:]}")
        now = _files(out)
        if now == previous:
            return delay
        if not out.exists():  # killed between the swap's two renames: the next run restores it
            assert _files(out.parent / f".{stage}.old") == previous
            return delay
        # the only other state allowed: the whole new output, swapped in
        assert now.keys() == previous.keys(), f"{stage}'s outputs are half-written after a kill"
        assert results(now) == reference_metrics, f"{stage} finished with other metrics or weights"
        previous.clear()
        previous.update(now)
        delay /= 4  # the stage finished before the kill: try an earlier moment
    pytest.fail(f"{stage} always finished before the kill")


# pretrain once more with a checkpoint every epoch and a longer run: killed after a checkpoint,
# the rerun resumes from it (instead of starting over) and must still give identical metrics
RESUME = ("trainer.checkpoint_budget=1", "pretrain.epochs=30")
CASES = [(stage, ()) for stage in STAGES] + [("pretrain", RESUME)]


@pytest.mark.slow
@pytest.mark.parametrize("stage,overrides", CASES, ids=[s + ("-resume" if o else "") for s, o in CASES])
def test_kill_9_mid_stage_then_rerun_gives_identical_metrics_and_weights(smoke_artifacts, tmp_path, stage, overrides):
    ref_cfg, _ = smoke_artifacts
    ref = Path(ref_cfg.paths.artifacts_dir)
    cfg = compose("experiment=smoke", *overrides, tmp=tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(params_text(cfg))
    # every stage's inputs as the pipeline made them; then the stage once, uninterrupted, in
    # a process of its own like every rerun below: its metrics are the reference
    shutil.copytree(ref, tmp_path / "artifacts", ignore=lambda d, names: [stage] if Path(d) == ref else [])
    out = tmp_path / "artifacts" / stage
    proc = _start(stage, params, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    previous = _files(out)
    reference_metrics = _metrics(previous)
    assert any(p.name == "model.pt" for p in reference_metrics), f"{stage} wrote no model.pt"

    rng = random.Random(stage)
    for trial in range(TRIALS):
        # killed mid-training: the previous outputs are untouched, nothing half-written is visible
        delay = _kill_mid_training(stage, params, tmp_path, rng, previous, reference_metrics,
                                   "**/checkpoints/last.ckpt" if overrides else "**/dvclive")
        # a resume needs a whole pair (checkpoint and logs): a kill before the first or after training
        # (the pair is gone, the outputs not yet in place) leaves none
        work = tmp_path / "artifacts" / f".{stage}.incomplete"
        resumable = any(resume_folder(c.parent.parent) for c in work.glob("**/checkpoints*/last.ckpt"))
        proc = _start(stage, params, tmp_path)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert _metrics(_files(out)) == reference_metrics, f"trial {trial}: metrics or weights differ"
        if overrides and resumable and _files(out) != previous:  # this rerun trained: it resumed
            assert json.loads((out / "timing.json").read_text())["resumed_at_epoch"], f"trial {trial}"
        assert not (tmp_path / "artifacts"
                    / f".{stage}.incomplete").exists(), f"trial {trial} (kill after {delay:.2f}s)"
        previous = _files(out)


# quantize with post-training quantization reported as a failure, so that it fine-tunes for INT8
# (the module a subprocess runs instead of transferkit.cli; the check's real result counts after)
FORCE_QAT = """import sys
from transferkit import cli
from transferkit.stages import quantize
real, calls = quantize.check, []
def check(*args):
    calls.append(real(*args))
    return {**calls[-1], "int8_top1": 0.0} if len(calls) == 1 else calls[-1]
quantize.check = check
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_mid_quantization_aware_fine_tuning_then_rerun_gives_identical_files(smoke_artifacts, tmp_path):
    ref = Path(smoke_artifacts[0].paths.artifacts_dir)
    cfg = compose("experiment=smoke", "quantize.max_drop=0.3", "quantize.qat_epochs=2", tmp=tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(params_text(cfg))
    (tmp_path / "force_qat.py").write_text(FORCE_QAT)
    shutil.copytree(ref, tmp_path / "artifacts", ignore=lambda d, names: ["quantize"] if Path(d) == ref else [])

    def start(stage, params, cwd):
        return _start(stage, params, cwd, entry=(str(tmp_path / "force_qat.py"),))

    def results(files):  # the INT8 model, its fine-tuned fp32 source and what the check measured
        return {p: data for p, data in files.items() if p.suffix == ".onnx" or p.name == "quantize.json"}

    out = tmp_path / "artifacts" / "quantize"
    _, err = start("quantize", params, tmp_path).communicate(timeout=300)
    previous = _files(out)
    reference = results(previous)
    assert json.loads(reference[Path("quantize.json")])["produced_by"].startswith("quantization-aware"), err[-2000:]
    assert Path("qat/model_fp32.onnx") in reference

    _kill_mid_training("quantize", params, tmp_path, random.Random("quantize"), previous, reference,
                       "**/qat/dvclive", start, results)
    proc = start("quantize", params, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert results(_files(out)) == reference
    assert not [p for p in _files(out) if p.name.endswith(".tmp")]  # no half-written file of a killed run
    assert not (tmp_path / "artifacts" / ".quantize.incomplete").exists()


def test_full_disk_gives_one_message_and_keeps_previous_outputs(smoke_artifacts, tmp_path, monkeypatch):
    import torch

    from conftest import run
    from transferkit.errors import TransferkitError

    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    cfg = compose("experiment=smoke", tmp=tmp_path)
    out = tmp_path / "artifacts" / "transfer"
    before = (out / "model.pt").read_bytes()

    def full(*args, **kwargs):  # what torch.save's writer raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TransferkitError, match="the disk is full.*Fix: free disk space"):
        run("transfer", cfg)
    assert (out / "model.pt").read_bytes() == before
    assert not (tmp_path / "artifacts" / ".transfer.incomplete").exists()


def test_a_full_disk_under_torchs_zip_writer_is_named_as_full(tmp_path):
    """torch.save on a full disk raises "unexpected pos 704 vs 598", its OSError (ENOSPC) as the context: that was a
    60-line traceback."""
    import errno

    from transferkit.errors import TransferkitError
    from transferkit.stages.common import storage_errors

    out = tmp_path / "artifacts" / "transfer"
    with pytest.raises(TransferkitError, match=rf"^the disk is full: writing {out} failed \(\[Errno 28\] No space left "
                                               rf"on device\)\. Fix: free disk space, or write to a disk with room "
                                               rf"\(--out DIR; for the pipeline's stages, paths\.artifacts_dir\); the "
                                               rf"previous transfer outputs are intact\.$"):
        with storage_errors(out):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:  # as torch's writer raises it: the OSError its context
                raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 704 vs 598")


def test_unwritable_output_folder_gives_one_message(tmp_path):
    from conftest import cli, one_error_line

    if os.geteuid() == 0:  # root ignores permission bits; /sys refuses new folders even to root
        target = Path("/sys/transferkit-test/artifacts")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "artifacts"
    try:
        target.mkdir(parents=True)
    except OSError:
        pass
    else:
        pytest.skip(f"{target} is writable here")
    cfg = compose("experiment=smoke", f"paths.artifacts_dir={target}")
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    line = one_error_line(cli("prepare", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path))
    assert "cannot" in line and "writable" in line


def test_a_read_only_file_system_gives_one_message(tmp_path):
    """A disk mounted read-only refuses writes with EROFS wherever in a stage they happen: one line naming the file
    and the fix, as for a folder this user may not write to."""
    import errno

    from transferkit.errors import TransferkitError
    from transferkit.stages.common import storage_errors

    out = tmp_path / "artifacts" / "transfer"
    for code in (errno.EROFS, errno.EACCES):
        with pytest.raises(TransferkitError, match=rf"cannot write {out / 'model.pt'}: {os.strerror(code)}\. Fix: "
                                                   rf"make {out.parent} writable"):
            with storage_errors(out):
                raise OSError(code, os.strerror(code), str(out / "model.pt"))


def test_an_artifacts_dir_that_is_a_file_gives_one_message(tmp_path):
    """paths.artifacts_dir naming a file: the stage's work folder cannot be made in it, which one line says, with
    the fix, before the stage starts."""
    from transferkit.errors import TransferkitError
    from transferkit.stages.common import staged_output

    (tmp_path / "artifacts").write_text("a file")
    with pytest.raises(TransferkitError, match=r"cannot create .*\.transfer\.incomplete: Not a directory\. Fix: make "
                                               r".*artifacts writable, or write elsewhere \(--out DIR; for the "
                                               r"pipeline's stages, paths\.artifacts_dir\)\.$"):
        with staged_output(tmp_path / "artifacts" / "transfer", "a: 1\n"):
            pytest.fail("the stage ran")
    assert (tmp_path / "artifacts").read_text() == "a file"


@pytest.mark.parametrize("stop, code, said", [("KeyboardInterrupt", -signal.SIGINT, "interrupted"),
                                              ("SystemExit(143)", 143, "stopped by SIGTERM")])  # as DieOnSigterm
def test_a_stop_before_a_fit_saved_anything_promises_no_resume(smoke_artifacts, tmp_path, stop, code, said):
    """The line said "the same command again resumes" whatever was left: a run stopped before its first checkpoint
    (or after its fit, once the checkpoints are gone) starts over, and its work folder is deleted. A SIGTERM still
    promised it."""
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(ref_cfg.paths.artifacts_dir, tmp_path / "artifacts")
    (tmp_path / "params.yaml").write_text(params_text(compose("experiment=smoke", tmp=tmp_path)))
    before = (tmp_path / "artifacts" / "pretrain" / "model.pt").read_bytes()
    program = ("import sys\nimport transferkit.stages.pretrain as stage\n"
               f"def run(cfg, inputs, work): raise {stop}\n"
               "stage.run = run\nfrom transferkit.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", program, "pretrain", "--params", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    assert proc.stderr.splitlines() == [f"transferkit pretrain: {said}; its earlier outputs, if any, are unchanged."]
    assert (tmp_path / "artifacts" / "pretrain" / "model.pt").read_bytes() == before
    assert not (tmp_path / "artifacts" / ".pretrain.incomplete").exists()


@pytest.mark.parametrize("stop", ["sigint", "sigterm"])
def test_ctrl_c_mid_training_ends_the_command_by_sigint(smoke_artifacts, tmp_path, stop):
    """Lightning ends an interrupted fit with exit(1), as a failure: a shell's loop around the command would
    go on to the next one. The command dies of SIGINT (130 in a shell) with its one line, as Python does. A SIGTERM
    (`timeout`, `kill`, a scheduler) exits 143 with its own line, where Lightning's "Received SIGTERM" was all."""
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(ref_cfg.paths.artifacts_dir, tmp_path / "artifacts")
    params = tmp_path / "params.yaml"
    params.write_text(params_text(compose("experiment=smoke", "pretrain.epochs=200", "trainer.checkpoint_budget=1",
                                          tmp=tmp_path)))
    # as from a terminal: a test worker may ignore SIGINT, and a child inherits that
    proc = _start("pretrain", params, tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    work = tmp_path / "artifacts" / ".pretrain.incomplete"
    while not _appeared(work, "**/last.ckpt") and time.monotonic() < deadline:  # something to resume from
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(1)
    proc.send_signal(signal.SIGINT if stop == "sigint" else signal.SIGTERM)
    assert proc.wait(60) == (-signal.SIGINT if stop == "sigint" else 128 + signal.SIGTERM)
    said = "interrupted" if stop == "sigint" else "stopped by SIGTERM"
    assert (f"transferkit pretrain: {said}; its earlier outputs, if any, are unchanged; the same command again "
            f"resumes." in proc.stderr.read())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a parent's death reaches a child through prctl")
def test_a_stage_ends_with_the_dvc_that_runs_it(smoke_artifacts, tmp_path):
    """`kill` of dvc repro alone (a CI cancel, a supervisor that signals the top process) ends the stage it runs at
    its next step, as a SIGTERM to the stage does, leaving its checkpoint to resume from and the earlier outputs as
    they were: an orphan would train on unseen and swap in outputs that dvc.lock does not record."""
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(ref_cfg.paths.artifacts_dir, tmp_path / "artifacts")
    before = (tmp_path / "artifacts" / "pretrain" / "model.pt").read_bytes()
    params = tmp_path / "params.yaml"
    params.write_text(params_text(compose("experiment=smoke", "pretrain.epochs=200", "trainer.checkpoint_budget=1",
                                          tmp=tmp_path)))
    stand_in = ("import subprocess, sys\n"  # dvc's part: start the stage with DVC_STAGE set, and wait for it
                "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
                "print(child.pid, flush=True)\nchild.wait()")
    dvc = subprocess.Popen([sys.executable, "-c", stand_in, sys.executable, "-m", "transferkit.cli", "pretrain",
                            "--params", str(params)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "DVC_STAGE": "pretrain"})
    stage = int(dvc.stdout.readline())
    deadline = time.monotonic() + 120
    work = tmp_path / "artifacts" / ".pretrain.incomplete"
    while not _appeared(work, "**/last.ckpt") and time.monotonic() < deadline:
        assert dvc.poll() is None, dvc.stderr.read()
        time.sleep(0.05)
    dvc.kill()
    dvc.wait()
    deadline = time.monotonic() + 60
    while running(stage) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(stage):  # a failure leaves no orphan training on
        os.kill(stage, signal.SIGKILL)
        pytest.fail("the stage trains on after dvc ended")
    assert _appeared(work, "**/last.ckpt")
    assert (tmp_path / "artifacts" / "pretrain" / "model.pt").read_bytes() == before
    assert "stopped by SIGTERM; its earlier outputs, if any, are unchanged; the same command again resumes." in (
        dvc.stderr.read())
