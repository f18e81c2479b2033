"""DDP with 2 CPU processes (gloo): the multi-device path runs for real, through the CLI
exactly as dvc repro calls it, with no code change: only `trainer=ddp`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, run
from transferkit.config.compose import params_text
from transferkit.io import load_torch
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
    # the recipe DDP makes of transfer.batch_size, said once (by rank 0)
    note = ("2 processes train on batches of 16 each, 32 a step together: 2 steps an epoch on 64 of the 72 images, "
            "against 4 on 64 in one process, at the same learning rate (transfer.batch_size is per process;")
    assert proc.stderr.count(note) == 1, proc.stderr[-3000:]
    out = tmp_path / "artifacts" / stage
    model, ckpt = load_checkpoint(out / "model.pt", stage)
    assert ckpt["classes"] == ["tgt_a", "tgt_b", "tgt_c"]
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["val_acc"] <= 1.0
    timing = json.loads((out / "timing.json").read_text())
    assert timing["processes"] == 2 and f"({timing['precision']} on cpu, 2 processes)" in proc.stderr + proc.stdout
    # 72 target images, 36 a rank: 2 steps of 16 an epoch on each of the 2 ranks (one process alone: 4 steps)
    assert (timing["train_images_per_second"] * timing["train_seconds"]
            == pytest.approx(cfg.transfer.epochs * 2 * 2 * 16, rel=0.02))
    assert not (tmp_path / "artifacts" / f".{stage}.incomplete").exists()
    assert bool(list(server_dir.glob("*/*.sock"))) == warm
    # the val loss logged at the last epoch is the saved model's: each rank scored its shard with rank 0's
    # BatchNorm statistics, not the ones its own last batch left
    task = load_torch(tmp_path / "artifacts" / "prepare" / "target.pt", "target", "prepare")
    model.eval()  # in the precision the run scored in: bf16 autocast moves the loss by more than 1e-4 of fp32's
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=timing["precision"] == "bf16-mixed"):
        loss = torch.nn.functional.cross_entropy(model(task["val_x"].float() / 255), task["val_y"]).item()
    logged = json.loads((out / "dvclive" / "metrics.json").read_text())["val"]["loss"]
    assert logged == pytest.approx(loss, rel=1e-4)


def _processes_naming(text: str) -> list[int]:
    """The live processes whose command line contains `text` (Linux /proc)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:  # it ended meanwhile
            pass
    return found


def _kill_left(proc, text: str, grace_s: float = 15.0) -> list[int]:
    """The processes naming `text` left `grace_s` after `proc`, a stopped command, ended (_left_after); they and
    `proc`, if it still runs, are then SIGKILLed, for the next test."""
    left = _left_after(text, grace_s)
    for pid in [proc.pid, *left]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    return left


def _rank_of(pid: int) -> str | None:
    """The LOCAL_RANK Lightning's launcher started process `pid` with: a process forked from rank 0 (to run another
    command, or rank 1 before it runs) names the same params file."""
    with contextlib.suppress(OSError):
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"LOCAL_RANK="):
                return entry.split(b"=", 1)[1].decode()
    return None


def _left_after(text: str, grace_s: float = 15.0) -> list[int]:
    """The processes naming `text` still live `grace_s` after their parent ended: a signalled rank takes a moment to
    exit on a loaded machine, and one stranded in a collective (what these tests guard against) hangs for minutes."""
    deadline = time.monotonic() + grace_s
    while (left := _processes_naming(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _ended(proc, log: Path, marker: str, timeout_s: float = 60.0) -> int:
    """The exit status of `proc`, stopped a moment ago. One still running after `timeout_s` fails the test with the
    Python stacks of every thread of it and of each process naming `marker`: started with PYTHONFAULTHANDLER=1, a
    process prints them into the log on SIGABRT."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_processes_naming(marker)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(3)
        pytest.fail(f"{proc.args[3:5]} still ran {timeout_s:.0f} s after it was stopped; its log and stacks:\n"
                    f"{log.read_text()[-15000:]}")


@pytest.mark.slow
def test_a_stage_that_fits_and_cuts_several_times_runs_under_ddp(tmp_path):
    """prune in two rounds ranked across layers at random: its later fits find the ranks Lightning started for the
    first (one rank 1, none left behind waiting for a process group), and every cut is rank 0's in every process (a
    rank ranking by its own BatchNorm statistics and draws cut a model of another shape, and DDP stopped)."""
    single = compose("experiment=smoke", "distill.epochs=1", tmp=tmp_path)
    for stage in ("prepare", "pretrain", "transfer", "distill"):
        run(stage, single)
    cfg = compose("experiment=smoke", "distill.epochs=1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.num_threads=1", "prune.scope=global", "prune.criterion=random", "prune.steps=2",
                  "prune.ratio=0.5", "prune.epochs=2", tmp=tmp_path)
    params = tmp_path / "ddp.yaml"
    params.write_text(params_text(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TRANSFERKIT_WARM": "0"}
    with open(tmp_path / "log.txt", "w") as log:  # a file, not a pipe: a process left behind would hold a pipe open
        code = subprocess.run([sys.executable, "-m", "transferkit.cli", "prune", "--params", str(params)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300).returncode
    output = (tmp_path / "log.txt").read_text()
    left = _left_after(str(params))  # rank 1 runs the command to its end too, and may end a moment after rank 0
    for pid in left:
        os.kill(pid, 9)
    assert code == 0, output[-3000:]
    assert output.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 1 and not left, (left, output[-3000:])
    assert json.loads((tmp_path / "artifacts" / "prune" / "metrics.json").read_text())["macs_reduction"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("stage, overrides", [("transfer", ("transfer.epochs=30",)),
                                              ("prune", ("prune.steps=2", "prune.epochs=30"))])
def test_a_sigterm_under_ddp_ends_every_rank_and_the_rerun_resumes(tmp_path, stage, overrides):
    """Lightning's own handler broadcasts the signal from inside the handler while the other rank waits in another
    collective: both hung until the process group timed out (30 minutes). prune is signalled in its last fit, whose
    trainer started no rank of its own (the first fit's rank 1 trains on)."""
    import signal
    import time

    single = compose("experiment=smoke", "distill.epochs=1", tmp=tmp_path)
    for made in ("prepare", "pretrain", *(("transfer", "distill") if stage == "prune" else ())):
        run(made, single)
    cfg = compose("experiment=smoke", "distill.epochs=1", "trainer=ddp", "trainer.accelerator=cpu",
                  "trainer.devices=2", "trainer.num_threads=1", "trainer.checkpoint_budget=1", *overrides, tmp=tmp_path)
    params = tmp_path / "ddp.yaml"
    params.write_text(params_text(cfg))
    command = [sys.executable, "-m", "transferkit.cli", stage, "--params", str(params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_WARM": "0", "PYTHONFAULTHANDLER": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        checkpoint = tmp_path / "artifacts" / f".{stage}.incomplete" / "checkpoints" / "last.ckpt"  # the last fit's
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        try:
            code = _ended(proc, tmp_path / "log.txt", str(params))
        finally:
            left = _kill_left(proc, str(params))
    assert code == -signal.SIGTERM and not left, ((tmp_path / "log.txt").read_text()[-3000:], left)
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((tmp_path / "artifacts" / stage / "timing.json").read_text())["resumed_at_epoch"]


def _ddp_params(tmp_path, *overrides: str):
    """The smoke experiment's prepare and pretrain, run in one process, and a params file that trains transfer in
    2 CPU processes with `overrides`."""
    single = compose("experiment=smoke", tmp=tmp_path)
    for stage in ("prepare", "pretrain"):
        run(stage, single)
    cfg = compose("experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.num_threads=1", *overrides, tmp=tmp_path)
    params = tmp_path / "ddp.yaml"
    params.write_text(params_text(cfg))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl_c", "sigint_to_the_parent", "kill_9_of_the_child"])
def test_a_ddp_run_in_hydra_mode_stopped_is_one_line_and_leaves_no_rank(tmp_path, how):
    """Hydra mode runs a DDP job as a child command in the same terminal: Ctrl+C reaches both. The child says
    so in its one line and ends its ranks; the parent waits for it (it was killed 0.25 s later by
    subprocess.run) and dies of SIGINT without a second line. A SIGINT to the parent alone (kill -INT, an IDE)
    is passed on; a child killed outright (out of memory) is one line from the parent, exit 137."""
    single = compose("experiment=smoke", tmp=tmp_path)
    for stage in ("prepare", "pretrain"):
        run(stage, single)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_WARM": "0", "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1"}  # _ended shows where a process that did not stop is
    marker = str(tmp_path / "hydra")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "transfer", "experiment=smoke", "trainer=ddp",
                                 "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_threads=1",
                                 "transfer.epochs=200", "trainer.checkpoint_budget=1", "trainer.progress_bar=false",
                                 f"paths.artifacts_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={marker}"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300  # a loaded machine: two ranks start, each importing torch
        while (not list((tmp_path / "hydra").glob(".transfer.incomplete/checkpoints/last.ckpt"))
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]  # still training when stopped
        if how == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's: the whole foreground group
        elif how == "sigint_to_the_parent":
            proc.send_signal(signal.SIGINT)
        else:
            child = [p for p in _processes_naming("transfer.params.yaml")  # rank 0, not the rank it started
                     if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
            os.kill(child[0], signal.SIGKILL)
        try:
            code = _ended(proc, tmp_path / "log.txt", marker)
        finally:
            left = _kill_left(proc, marker, grace_s=0 if how == "kill_9_of_the_child" else 15.0)
    output = (tmp_path / "log.txt").read_text()
    if how == "kill_9_of_the_child":
        assert code == 137 and "Traceback" not in output, output[-3000:]
        assert output.count("transferkit transfer: error: its process was killed by signal 9") == 1, output[-3000:]
    else:
        assert code == -signal.SIGINT and not left, (output[-3000:], left)
        # as without DDP, no promise that the same command resumes: Hydra gives a rerun a new folder by default
        assert output.count("transferkit transfer: interrupted; its earlier outputs, if any, are unchanged.\n") == 1, \
            output[-3000:]


@pytest.mark.slow
def test_a_rank_killed_mid_fit_is_one_line_naming_it_and_its_checkpoint_is_kept(tmp_path):
    """The out-of-memory killer takes rank 1: rank 0's collective fails with its backend's traceback unless
    the command says which rank died and how, and that the next run resumes."""
    params = _ddp_params(tmp_path, "transfer.epochs=200", "trainer.checkpoint_budget=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_WARM": "0", "PYTHONFAULTHANDLER": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "transfer", "--params", str(params)],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        checkpoint = tmp_path / "artifacts" / ".transfer.incomplete" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            rank1 = [pid for pid in _processes_naming(str(params)) if _rank_of(pid) == "1"]
            os.kill(rank1[0], signal.SIGKILL)
            code = _ended(proc, tmp_path / "log.txt", str(params))
        finally:
            for pid in [proc.pid, *_processes_naming(str(params))]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
    output = (tmp_path / "log.txt").read_text()
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert output.count("transferkit transfer: error: rank 1 of the fit was killed by signal 9 (Killed)") == 1
    assert "Forcefully terminating" not in output, output[-3000:]  # Lightning's observer, had it seen the rank end
    assert "Fix: run the stage again: it resumes from its last checkpoint" in output and checkpoint.exists()


@pytest.mark.slow
def test_a_rank_killed_as_the_fit_starts_is_one_line_naming_it(tmp_path):
    """Killed before it joined the process group, rank 1 left rank 0 waiting for it, where no collective fails:
    Lightning's observer SIGKILLed rank 0 5 s on, and the command ended -9 without a word."""
    params = _ddp_params(tmp_path, "transfer.epochs=200")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_WARM": "0", "PYTHONFAULTHANDLER": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "transfer", "--params", str(params)],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while (not (rank1 := [pid for pid in _processes_naming(str(params)) if _rank_of(pid) == "1"])
                   and proc.poll() is None and time.monotonic() < deadline):
                time.sleep(0.02)
            os.kill(rank1[0], signal.SIGKILL)  # still importing its libraries
            code = _ended(proc, tmp_path / "log.txt", str(params))
        finally:
            left = _kill_left(proc, str(params))
    output = (tmp_path / "log.txt").read_text()
    assert code == 2 and "Traceback" not in output and not left, (left, output[-3000:])
    assert output.count("transferkit transfer: error: rank 1 of the fit was killed by signal 9 (Killed) while the fit "
                        "started. Fix: run the stage again") == 1, output[-3000:]
    assert "Forcefully terminating" not in output, output[-3000:]  # Lightning's own line on it: one line says it


def test_lightnings_rank_observer_gives_this_process_time_to_say_which_rank_ended(monkeypatch):
    """Lightning's observer SIGKILLs the main process within 5 s of a rank ending, which can come before the main
    process's collective fails and it names the rank (a loaded CI machine ended the test above -9, with no line)."""
    from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from transferkit.training.ranks import watch_ranks

    monkeypatch.setattr(_ChildProcessObserver, "_terminate_all", _ChildProcessObserver._terminate_all)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # a process group: a collective fails
    watch_ranks(grace_s=3.0)
    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for the main process
    rank = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        _ChildProcessObserver(main_pid=main.pid, child_processes=[rank], sleep_period=0.5).start()
        rank.wait()
        time.sleep(1.5)  # the observer has seen the rank end
        assert main.poll() is None
        assert main.wait(timeout=10) == -signal.SIGKILL  # a main process that hangs is still ended
    finally:
        main.kill()


def test_the_rank_observer_waits_once_whatever_the_fits_that_watch_it(monkeypatch):
    """Every fit (prune has several) makes a DieOnSigterm, and so watches the ranks again: the observer still waits
    `grace_s` once before Lightning's own end of the processes, not once more for each fit."""
    from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from transferkit.training.ranks import watch_ranks

    ended, slept = [], []
    monkeypatch.setattr(_ChildProcessObserver, "_terminate_all", lambda observer: ended.append(observer))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for _ in range(3):  # prune: its first fit and two later ones
        watch_ranks(grace_s=30.0)
    monkeypatch.setattr(time, "sleep", slept.append)
    observer = _ChildProcessObserver(main_pid=os.getpid(), child_processes=[])
    observer._terminate_all()
    assert slept == [30.0] and ended == [observer]


def test_a_sigterm_is_passed_on_to_every_rank_this_process_started():
    """The SIGTERM that reaches rank 0 (a scheduler, `kill`) is sent on to the ranks it started before it dies of it:
    a rank waiting in a collective whose backend does not notice a lost peer would wait for the process group's
    timeout (30 minutes)."""
    rank = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('rank 1: SIGTERM', file=sys.stderr), sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n")  # ends without a word only where the signal never comes
    main = ("import os, signal, subprocess, sys, time\n"
            "from transferkit.training.ranks import DieOnSigterm\n"
            f"rank = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=subprocess.PIPE, text=True)\n"
            "assert rank.stdout.readline() == 'ready\\n'\n"
            "DieOnSigterm.started[:] = [rank]\n"
            "signal.signal(signal.SIGTERM, DieOnSigterm.die)  # as on_train_start installs it\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", main], capture_output=True, text=True, timeout=120)  # and its rank's
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["rank 1: SIGTERM"], proc.stderr[-2000:]


@pytest.mark.slow
def test_an_error_every_rank_meets_is_one_line_under_ddp(tmp_path):
    params = _ddp_params(tmp_path, "transfer.lr=1e30", "transfer.epochs=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_WARM": "0"}
    with open(tmp_path / "log.txt", "w") as log:
        code = subprocess.run([sys.executable, "-m", "transferkit.cli", "transfer", "--params", str(params)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300).returncode
    output = (tmp_path / "log.txt").read_text()
    assert code == 2 and output.count("transferkit transfer: error: training diverged") == 1, output[-3000:]


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
