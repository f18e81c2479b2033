"""TRANSFERKIT_WARM=1: stage commands run in workers forked from a server that imported torch and
Lightning once. They must write what a fresh process writes, report errors and exit codes the same
way, die with their command, and never run stale project code."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TINY, cli, compose, one_error_line
from transferkit import warm
from transferkit.config.compose import params_text


def _params(folder: Path, *overrides: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(params_text(compose("experiment=smoke", *TINY, *overrides)))
    return path


def _transferkit(args: list[str], cwd: Path, warm_on: bool) -> subprocess.CompletedProcess:
    return cli(*args, cwd=cwd, env={"TRANSFERKIT_WARM": "1" if warm_on else "0"})


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "timing.json"}


@pytest.mark.slow
def test_warm_stages_write_what_fresh_processes_write(tmp_path, server_dir, monkeypatch):
    for name, warm_on in (("cold", False), ("warm", True)):
        _params(tmp_path / name)
        for stage in ("prepare", "pretrain", "transfer"):
            proc = _transferkit([stage, "--params", "params.yaml"], tmp_path / name, warm_on)
            assert proc.returncode == 0, proc.stderr[-3000:]
            # the worker's output reached the command's streams: Lightning's device lines and the stage's scores
            assert stage == "prepare" or ("GPU available" in proc.stderr and ": top-1 val " in proc.stdout)
    # prepare, the first warm command, started the server and ran itself; pretrain and transfer were served
    assert list(server_dir.glob("*/*.sock")), "no warm server was started"
    cold, hot = _outputs(tmp_path / "cold" / "artifacts"), _outputs(tmp_path / "warm" / "artifacts")
    assert cold.keys() == hot.keys() and any(k.endswith("model.pt") for k in cold)
    assert [k for k in cold if cold[k] != hot[k]] == []
    # warm.run itself (this process's environment picks a server of its own): the first call finds
    # none, starts it and answers None (its caller runs the command); the next one is served
    monkeypatch.chdir(tmp_path / "warm")
    monkeypatch.setenv("TRANSFERKIT_WARM", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the commands above ran (conftest.cli): the same numbers
    assert warm.run(["prepare", "--params", "params.yaml"]) is None
    deadline = time.monotonic() + 60
    while not warm.socket_path().exists() and time.monotonic() < deadline:  # the server binds, then imports
        time.sleep(0.05)
    handlers = {sig: signal.getsignal(sig) for sig in warm.FORWARDED}
    assert warm.run(["prepare", "--params", "params.yaml"]) == 0
    # the handlers that pass signals on to the worker end with its command: a caller in this process (cli.main
    # as a library, pytest) kept one that killed a pid long gone at its next SIGTERM (a later test's failure)
    assert {sig: signal.getsignal(sig) for sig in warm.FORWARDED} == handlers
    # a training stage served (0, not None: it ran in a worker) writes what the fresh process wrote
    shutil.rmtree(tmp_path / "warm" / "artifacts" / "transfer")
    assert warm.run(["transfer", "--params", "params.yaml"]) == 0
    assert _outputs(tmp_path / "warm" / "artifacts") == cold


def test_bad_input_gives_the_same_one_error_line_and_exit_code(tmp_path, server_dir):
    # the first warm command finds no server: it starts one and runs itself; the second is served
    lines = [one_error_line(_transferkit(["pretrain", "--params", "missing.yaml"], tmp_path, warm_on))
             for warm_on in (False, True, True)]
    assert lines[0] == lines[1] == lines[2]
    assert list(server_dir.glob("*/*.sock"))


def test_the_server_is_picked_by_what_shapes_imports_and_threads_not_by_what_torch_sets(server_dir, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS"):  # set below, then removed again
        monkeypatch.delenv(name, raising=False)
    first = warm.socket_path()
    # torch sets this in its own process once it uses its compiler's cache; a script's later commands
    # pass it on and must still reach the server its earlier ones started
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(server_dir / "inductor"))
    assert warm.socket_path() == first
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # imports run under it: another server
    assert warm.socket_path() != first
    monkeypatch.delenv("OMP_NUM_THREADS")
    for name, value in (("MPLBACKEND", "svg"), ("DVCLIVE_LOGLEVEL", "DEBUG")):  # read as their libraries import
        with monkeypatch.context() as m:
            m.setenv(name, value if os.environ.get(name) != value else "agg")
            assert warm.socket_path() != first
    with monkeypatch.context() as m:  # the locale: the encoding of the streams a worker opens
        m.setenv("LC_ALL", "C" if os.environ.get("LC_ALL") != "C" else "C.UTF-8")
        assert warm.socket_path() != first
    # what a worker keeps from its server: another umask (the permissions of what a stage writes) or
    # other CPUs (taskset, a batch job's share; torch sizes its thread pool by them): another server
    mask = os.umask(0o077)
    os.umask(0o027 if mask == 0o077 else 0o077)  # another umask than this process's
    try:
        assert warm.socket_path() != first
    finally:
        os.umask(mask)
    assert warm.socket_path() == first
    if hasattr(os, "sched_getaffinity"):
        cpus = set(range(len(os.sched_getaffinity(0)) + 1))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
        assert warm.socket_path() != first


def test_the_server_imports_no_project_code_and_leaves_cuda_alone():
    """The server runs warm/server.py as a file (as _start_server starts it), not as part of the package."""
    code = (f"import runpy, sys, torch; runpy.run_path({warm.server.__file__!r})['preload'](); "
            "print(sorted(m for m in sys.modules if m.startswith('transferkit')), torch.cuda.is_initialized(), "
            "'pytorch_lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False", "True"]


@pytest.mark.slow
def test_killing_a_warm_command_kills_its_worker(tmp_path, server_dir):
    _params(tmp_path, "pretrain.epochs=50")
    assert _transferkit(["prepare", "--params", "params.yaml"], tmp_path, True).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_WARM": "1"}
    command = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "pretrain", "--params", "params.yaml"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers() -> list[int]:  # processes working in this test's folder, but the command itself
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int(entry.name) != command.pid and \
                        Path(os.readlink(entry / "cwd")) == tmp_path:
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 60
    while not (tmp_path / "artifacts" / ".pretrain.incomplete").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers(), "the worker never started"
    command.send_signal(signal.SIGKILL)
    command.wait()
    deadline = time.monotonic() + 10
    while workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers() == []
    assert not (tmp_path / "artifacts" / "pretrain").exists()  # nothing half-written took the output's place


FAKE_CLI = '''import os, signal, sys, time
def main(argv):
    if argv[0] == "sleep":  # until a signal ends it (Ctrl+C: a KeyboardInterrupt nothing catches)
        print("ready", flush=True)
        time.sleep(30)
        return 0
    if argv[0] == "pid":  # its pid, then a sleep that a signal may end
        print(os.getpid(), flush=True)
        time.sleep(30)
        return 0
    if argv[0] == "nap":  # a command that runs for a while
        time.sleep(float(argv[1]))
        return 0
    if argv[0] == "env":  # a variable as this process has it
        print(os.environ.get(argv[1]), flush=True)
        return 0
    if argv[0] == "crash":  # an exit handler, then an error nothing catches
        import atexit
        atexit.register(lambda: open(argv[1], "w").write("ran"))
        raise RuntimeError("crash")
    if argv[0] == "exit":  # an exit status, at once or (with "term") from a SIGTERM handler, as the trainer's
        if argv[2:]:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(argv[1])))
            print("ready", flush=True)
            time.sleep(30)
        sys.exit(int(argv[1]))
    if argv[0] == "rc":  # a matplotlib setting as this process has it
        import matplotlib
        print(matplotlib.rcParams[argv[1]], flush=True)
        return 0
    if argv[0] == "streams":  # each standard stream's encoding and error handling, and a character ASCII lacks
        print(*(f"{s.encoding}:{s.errors}" for s in (sys.stdin, sys.stdout, sys.stderr)), "\u2013")
        return 0
    if argv[0] == "masks":  # each thread's blocked signals (/proc: SigBlk, a hex bit mask), the main thread first
        tasks = sorted(os.listdir("/proc/self/task"), key=lambda t: int(t) != os.getpid())
        for task in tasks:
            status = open(f"/proc/self/task/{task}/status").read()
            print(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")))
        return 0
    return 3
'''


def _started_server(fake: Path, server_dir: Path, **popen) -> None:
    """A client that finds no server starts one and runs its command itself (100 here); the server
    binds its socket a moment later, and a client that came before that would start another."""
    assert _warm_client(fake, server_dir, "none", **popen).wait(60) == 100
    deadline = time.monotonic() + 60
    while not list(server_dir.glob("*/*.sock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(server_dir.glob("*/*.sock")), "the server never bound its socket"


def _fake_project(folder: Path) -> Path:
    """A `transferkit` package of this warm package and a cli whose commands take no time to import: the
    warm machinery under test, not a stage."""
    package = folder / "fake" / "transferkit"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "warm").mkdir()
    for module in (warm, warm.server):
        (package / "warm" / Path(module.__file__).name).write_text(Path(module.__file__).read_text())
    (package / "training").mkdir()  # warm reads who is a first process from it
    shutil.copy(Path(warm.__file__).parents[1] / "training" / "__init__.py", package / "training")
    shutil.copy(Path(warm.__file__).parents[1] / "errors.py", package)  # and how it dies of a signal
    (package / "cli.py").write_text(FAKE_CLI)
    return package.parent


def _warm_client(fake: Path, server_dir: Path, *argv: str, **popen) -> subprocess.Popen:
    """warm.run(ARGV) in a process of its own, exiting with its code (100: not served)."""
    code = "import sys; from transferkit import warm; r = warm.run(sys.argv[1:]); sys.exit(100 if r is None else r)"
    env = {**os.environ, "PYTHONPATH": str(fake), "TRANSFERKIT_WARM": "1", "TMPDIR": str(server_dir)}
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE, text=True, **popen)


def test_a_warm_command_takes_its_own_signal_dispositions_and_dies_of_the_signal_it_passed_on(tmp_path, server_dir):
    """The server is started by a command that ignores SIGINT and SIGHUP (a script's background job,
    nohup): a later command's Ctrl+C must still reach its worker. A worker ended by the SIGINT or SIGTERM
    its command passed on ends the command by that signal too (-2 or -15; 130 or 143 in a shell), as a
    process run there would, not with exit 1."""
    fake = _fake_project(tmp_path)

    def ignoring() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def default() -> None:  # as from a terminal, whatever this test inherited (a script's `cmd &` ignores SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    _started_server(fake, server_dir, preexec_fn=ignoring)
    for sig in (signal.SIGINT, signal.SIGTERM):
        client = _warm_client(fake, server_dir, "sleep", preexec_fn=default)
        assert client.stdout.readline() == "ready\n"  # served: the worker runs the command
        # SIGINT's bit is set from start-up (Python's own handler); SIGCONT's is set with the passing-on ones
        assert _until(lambda: _catches(client, sig) and _catches(client, signal.SIGCONT))
        start = time.monotonic()
        client.send_signal(sig)
        assert client.wait(20) == -sig and time.monotonic() - start < 10  # as `python -c ...` dies of either


SIGNAL_FROM_ANOTHER_THREAD = """import os, signal, sys, threading, time
from transferkit import warm
def later():  # once the command passes SIGTERM on and waits for its worker: a signal this thread takes
    while signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    while True:  # here to take the SIGTERM the command ends itself with
        time.sleep(1)
threading.Thread(target=later, daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
r = warm.run(sys.argv[1:])
sys.exit(100 if r is None else r)
"""


def test_a_signal_that_comes_just_before_the_command_waits_for_its_worker_still_reaches_the_worker(tmp_path,
                                                                                                   server_dir):
    """A handler runs between bytecodes: a signal that came as the command entered its blocking wait (or that
    another of its threads took, as here, the same case made sure) ran no handler until the worker ended on
    its own, and a Ctrl+C then went unheeded for a whole training run. The wait wakes for it."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    env = {**os.environ, "PYTHONPATH": str(fake), "TRANSFERKIT_WARM": "1", "TMPDIR": str(server_dir)}
    client = subprocess.Popen([sys.executable, "-c", SIGNAL_FROM_ANOTHER_THREAD, "sleep"], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline() == "ready\n"
    start = time.monotonic()
    assert client.wait(40) == -signal.SIGTERM and time.monotonic() - start < 10  # the worker sleeps 30 s


MANY_FILES_OPEN = """import os, sys
from transferkit import warm
while os.dup(0) < 1100:  # a caller with many files open (a test run, a long-lived library user)
    pass
r = warm.run(sys.argv[1:])
sys.exit(100 if r is None else r)
"""


def test_a_command_with_over_a_thousand_files_open_is_served(tmp_path, server_dir):
    """select() takes no descriptor past 1023: a caller holding more files (the test run that found it) got a
    ValueError traceback instead of its command's exit code."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("this process may not open 1,200 files")
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    env = {**os.environ, "PYTHONPATH": str(fake), "TRANSFERKIT_WARM": "1", "TMPDIR": str(server_dir)}
    client = subprocess.run([sys.executable, "-c", MANY_FILES_OPEN, "exit", "7"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert client.returncode == 7 and client.stderr == "", client.stderr[-2000:]


def test_a_command_whose_environment_outgrows_the_socket_buffer_is_served(tmp_path, server_dir):
    """A header larger than the socket's buffer (an environment of exported shell functions, HPC modules) is
    sent in parts: the first send took what fit and the worker waited for the rest for ever."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    big = {f"BIG{i}": "a" * 100_000 for i in range(4)}
    env = {**os.environ, **big, "PYTHONPATH": str(fake), "TRANSFERKIT_WARM": "1", "TMPDIR": str(server_dir)}
    code = "import sys; from transferkit import warm; r = warm.run(sys.argv[1:]); sys.exit(100 if r is None else r)"
    client = subprocess.run([sys.executable, "-c", code, "env", "BIG3"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert client.returncode == 0 and client.stdout == big["BIG3"] + "\n", client.stderr[-2000:]


def test_a_warm_command_reads_the_matplotlibrc_of_its_folder(tmp_path, server_dir):
    """The server imports matplotlib (through Lightning) in /, so a worker's plots ignored the matplotlibrc of the
    command's folder, which a fresh process reads: the same stage drew other plots warm."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    project = tmp_path / "project"
    project.mkdir()
    (project / "matplotlibrc").write_text("font.size: 17\n")
    assert _warm_client(fake, server_dir, "rc", "font.size", cwd=project).communicate(timeout=60)[0] == "17.0\n"
    assert _warm_client(fake, server_dir, "rc", "font.size", cwd=tmp_path).communicate(timeout=60)[0] == "10.0\n"


@pytest.mark.parametrize("argv, status", [(("exit", "-1"), 255), (("exit", "143", "term"), 143)])
def test_a_warm_command_exits_with_the_status_a_fresh_process_exits_with(tmp_path, server_dir, argv, status):
    """The trainer's SIGTERM handler exits with 143 so that DVC records a failure: an exit with that
    status, not death by SIGTERM (-15 to its parent); sys.exit(-1) exits with 255, not by signal 1."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    cold = [sys.executable, "-c", "import sys; from transferkit.cli import main; sys.exit(main(sys.argv[1:]))", *argv]
    codes = []
    for client in (subprocess.Popen(cold, env={**os.environ, "PYTHONPATH": str(fake)}, stdout=subprocess.PIPE,
                                    text=True), _warm_client(fake, server_dir, *argv)):
        if argv[2:]:
            assert client.stdout.readline() == "ready\n" and _until(lambda: _catches(client, signal.SIGTERM))
            client.send_signal(signal.SIGTERM)
        codes.append(client.wait(20))
    assert codes == [status, status]


@pytest.mark.parametrize("encoding", ["ascii:replace", "latin-1", None])
def test_a_warm_command_writes_in_the_encoding_a_fresh_process_writes_in(tmp_path, server_dir, monkeypatch, encoding):
    """PYTHONIOENCODING (and the locale) pick the streams' encoding and error handling at start-up; a
    worker's streams are opened anew, so they take them from its server, which the same settings picked."""
    if encoding:
        monkeypatch.setenv("PYTHONIOENCODING", encoding)
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    cold = [sys.executable, "-c", "import sys; from transferkit.cli import main; sys.exit(main(sys.argv[1:]))",
            "streams"]
    outputs = []
    for client in (subprocess.Popen(cold, env={**os.environ, "PYTHONPATH": str(fake)}, stdout=subprocess.PIPE),
                   _warm_client(fake, server_dir, "streams")):
        out = client.stdout.read()
        outputs.append((out if isinstance(out, bytes) else out.encode(), client.wait(20)))
    assert outputs[0] == outputs[1], outputs  # latin-1 has no en dash: an error and exit 1 either way


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads each thread's signal mask from /proc")
def test_only_the_workers_main_thread_takes_the_signals_a_command_passes_on(tmp_path, server_dir):
    """The kernel gives a process signal to any thread that does not block it: one the worker's watcher
    thread took would wait until the main thread's blocking call returned (a Ctrl+C ignored for the 30 s of
    the fake command's sleep), so the watcher blocks them."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "masks")
    masks = [int(line, 16) for line in client.stdout.read().split()]
    assert client.wait(60) == 0 and len(masks) >= 2  # the main thread and the watcher
    forwarded = sum(1 << (sig - 1) for sig in warm.FORWARDED)
    assert masks[0] & forwarded == 0 and all(m & forwarded == forwarded for m in masks[1:])


def test_a_worker_killed_by_a_signal_ends_its_command_by_that_signal(tmp_path, server_dir):
    """kill -9 (or the kernel's out-of-memory killer) leaves the worker no time to send its exit code: the
    server, which reaps it, sends the signal, and the command dies of it (-9; 137 in a shell), as it would cold."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "pid")
    worker = int(client.stdout.readline())
    os.kill(worker, signal.SIGKILL)
    assert client.wait(20) == -signal.SIGKILL


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _read(path: Path) -> bytes:  # a process's /proc file, empty once it has ended
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _until(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _catches(client: subprocess.Popen, sig: int) -> bool:
    """Whether the client has its handler for `sig` in place (/proc's SigCgt mask): it sets them once its worker
    is forked, and the worker may print before that; a person's Ctrl+C or Ctrl+Z comes later than a test's."""
    if not Path(f"/proc/{client.pid}/status").exists():
        return True
    status = Path(f"/proc/{client.pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (sig - 1) & 1)


def _stopped_client(tmp_path: Path, server_dir: Path) -> tuple[subprocess.Popen, int]:
    """A served command and its worker, after Ctrl+Z (SIGTSTP) reached the command."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    # a process group of its own whose parent is in this session: not orphaned, so SIGTSTP stops it
    client = _warm_client(fake, server_dir, "pid", process_group=0,
                          preexec_fn=lambda: signal.signal(signal.SIGTSTP, signal.SIG_DFL))
    worker = int(client.stdout.readline())
    assert _until(lambda: _catches(client, signal.SIGTSTP))
    client.send_signal(signal.SIGTSTP)
    return client, worker


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the worker's state from /proc")
def test_ctrl_z_stops_the_worker_with_its_command_and_fg_resumes_both(tmp_path, server_dir):
    client, worker = _stopped_client(tmp_path, server_dir)
    assert _until(lambda: (_state(worker), _state(client.pid)) == ("T", "T"))
    client.send_signal(signal.SIGCONT)
    assert _until(lambda: _state(worker) != "T") and _state(client.pid) != "T"
    os.kill(worker, signal.SIGTERM)
    assert client.wait(20) == -signal.SIGTERM


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the worker's state from /proc")
def test_a_worker_stopped_with_its_command_dies_when_the_command_is_killed(tmp_path, server_dir):
    """A stopped worker cannot run the thread that watches its command: the server kills it once the
    command is gone (Ctrl+Z, then kill -9), instead of keeping it, and its memory, stopped for ever."""
    client, worker = _stopped_client(tmp_path, server_dir)
    assert _until(lambda: _state(worker) == "T")
    client.kill()
    client.wait()
    assert _until(lambda: not Path(f"/proc/{worker}").exists())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server from /proc")
def test_a_server_without_an_idle_limit_serves(tmp_path, server_dir, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_WARM_IDLE", "inf")
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "pid")
    worker = int(client.stdout.readline())
    server = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the worker's parent
    try:
        os.kill(worker, signal.SIGTERM)
        assert client.wait(20) == -signal.SIGTERM  # served (the fake cli's pid is a worker's), and reported
    finally:
        os.kill(server, signal.SIGTERM)  # it would wait for commands for ever


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the worker's state from /proc")
def test_a_stop_that_an_orphaned_command_never_takes_leaves_its_worker_running(tmp_path, server_dir):
    """The kernel discards SIGTSTP for a process group no parent in its session watches (a session of its
    own, a job whose shell has gone): the command runs on, as it would cold, and so must its worker."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "pid", start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGTSTP, signal.SIG_DFL))
    worker = int(client.stdout.readline())
    assert _until(lambda: _catches(client, signal.SIGTSTP))
    client.send_signal(signal.SIGTSTP)
    time.sleep(1)
    assert _state(client.pid) != "T" and _state(worker) != "T"
    os.kill(worker, signal.SIGTERM)
    assert client.wait(20) == -signal.SIGTERM


def test_a_command_that_fails_runs_its_exit_handlers_warm_too(tmp_path, server_dir):
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "crash", str(tmp_path / "handler-ran"))
    assert client.wait(20) == 1 and (tmp_path / "handler-ran").read_text() == "ran"


def test_a_stopped_server_leaves_the_command_to_run_itself(tmp_path, monkeypatch):
    """A server that accepts nothing (stopped with SIGSTOP, stuck) would leave its commands waiting forever."""
    import socket

    path = Path(tempfile.mkdtemp(prefix="tkw")) / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # never accepts, never closes
    monkeypatch.setattr(warm, "socket_path", lambda: path)
    monkeypatch.setattr(warm, "HANDSHAKE_S", 0.5)
    start = time.monotonic()
    assert warm.run(["prepare", "--params", "params.yaml"]) is None and time.monotonic() - start < 5
    listener.close()
    shutil.rmtree(path.parent)


@pytest.mark.parametrize("idle", ["0", "-5", "soon"])
def test_an_idle_time_that_is_no_positive_number_turns_warm_off_in_one_line(monkeypatch, capsys, idle):
    monkeypatch.setenv("TRANSFERKIT_WARM", "1")
    monkeypatch.setenv("TRANSFERKIT_WARM_IDLE", idle)
    assert not warm.enabled()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"transferkit: TRANSFERKIT_WARM_IDLE={idle} is no number of seconds > 0, so no warm server starts. Fix: "
        f"unset it or set a number such as 600."]


def test_an_empty_idle_time_is_the_default_as_an_empty_warm_setting_is_off(monkeypatch, capsys):
    monkeypatch.setenv("TRANSFERKIT_WARM_IDLE", "")
    assert warm.idle_seconds() == 600 and capsys.readouterr().err == ""


def test_a_socket_folder_others_can_open_turns_warm_off_in_one_line(server_dir, monkeypatch, capsys):
    """Another user's folder (or this user's, opened to others) could hold a socket someone else serves:
    the command runs cold, and says why and what to do, rather than silently losing warm starts."""
    folder = server_dir / f"transferkit-warm-{os.getuid()}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert warm.run(["prepare", "--params", "params.yaml"]) is None
    assert capsys.readouterr().err.strip().splitlines() == [
        f"transferkit: TRANSFERKIT_WARM=1, but no warm server can serve: {folder} is not a folder private to this "
        f"user (mode 700, owned by it). Fix: remove it, or set TMPDIR to a folder of your own."]
    assert list(folder.iterdir()) == []  # no server started


def test_a_server_that_closes_as_a_command_connects_leaves_the_command_to_run_itself(tmp_path, monkeypatch):
    """Its idle timeout, or a kill, closes the server's socket with this connection in its backlog: the
    command runs locally (None), not a traceback."""
    import socket
    import threading

    path = Path(tempfile.mkdtemp(prefix="tkw")) / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # never accepts
    monkeypatch.setattr(warm, "socket_path", lambda: path)
    threading.Timer(0.5, listener.close).start()
    assert warm.run(["prepare", "--params", "params.yaml"]) is None
    shutil.rmtree(path.parent)


def test_a_command_under_other_resource_limits_gets_a_server_of_its_own(server_dir):
    """A worker keeps its server's limits, so `ulimit -n 256` or a memory cap must pick another server."""
    import resource

    first = warm.socket_path()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))
    try:
        assert warm.socket_path() != first
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert warm.socket_path() == first


def test_the_idle_time_counts_from_the_end_of_a_command_and_workers_keep_what_the_imports_set(tmp_path, server_dir,
                                                                                             monkeypatch):
    """A stage longer than the idle time must not leave the next one without a server; and a worker has what
    importing Lightning sets in a fresh process (PYTORCH_NVML_BASED_CUDA_CHECK), though its command had not."""
    monkeypatch.setenv("TRANSFERKIT_WARM_IDLE", "2")
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    assert _warm_client(fake, server_dir, "nap", "0").wait(60) == 0  # served once the server has imported
    assert _warm_client(fake, server_dir, "nap", "4").wait(60) == 0
    client = _warm_client(fake, server_dir, "env", "PYTORCH_NVML_BASED_CUDA_CHECK")
    assert client.wait(60) == 0 and client.stdout.read() == "1\n"


def test_a_worker_keeps_the_compiler_cache_folder_its_command_names(tmp_path, server_dir, monkeypatch):
    """A server's imports set TORCHINDUCTOR_CACHE_DIR, and a worker took the server's value over its command's own,
    where torch in a fresh process keeps the user's folder."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    assert _warm_client(fake, server_dir, "nap", "0").wait(60) == 0  # served once the server has imported
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the same server serves it
    client = _warm_client(fake, server_dir, "env", "TORCHINDUCTOR_CACHE_DIR")
    assert client.wait(60) == 0 and client.stdout.read() == f"{tmp_path / 'mine'}\n"


@pytest.mark.parametrize("value", ["true", "off", "yes"])
def test_a_warm_setting_other_than_1_or_0_turns_warm_off_in_one_line(monkeypatch, capsys, value):
    monkeypatch.setenv("TRANSFERKIT_WARM", value)
    assert not warm.enabled()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"transferkit: TRANSFERKIT_WARM={value} is neither 1 nor 0, so no warm server serves. Fix: set it to 1 (on) "
        f"or 0 (off)."]


def test_the_ranks_a_command_run_cold_starts_start_no_servers(tmp_path, monkeypatch):
    """Lightning starts DDP's other ranks with the command's environment and a LOCAL_RANK of their own: each
    would otherwise find no server for its key and start one."""
    from transferkit import cli as tk_cli

    monkeypatch.setenv("TRANSFERKIT_WARM", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not warm.enabled()  # a rank runs as its launcher starts it
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(warm, "run", lambda argv: None)  # no server yet: the command runs itself
    assert tk_cli.main(["pretrain", "--params", str(tmp_path / "none.yaml")]) == 2  # ran here (and failed)
    assert "TRANSFERKIT_WARM" not in os.environ


def test_ctrl_c_while_a_command_waits_for_its_server_is_one_line(tmp_path):
    code = ("import sys; from transferkit import cli, warm\n"
            "def interrupted(argv): raise KeyboardInterrupt\n"
            "warm.run = interrupted\nsys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "pretrain", "--params", "params.yaml"], cwd=tmp_path,
                          env={**os.environ, "TRANSFERKIT_WARM": "1"}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGINT
    assert proc.stderr.splitlines() == [  # no stage ran, so nothing says a fit is left to resume
        "transferkit pretrain: interrupted; its earlier outputs, if any, are unchanged."]


def test_a_command_started_with_other_interpreter_options_gets_a_server_of_its_own(server_dir):
    """A worker runs with its server's -O, -W and -X: a command with others must not be served by it."""
    code = "from transferkit import warm; print(warm.socket_path())"
    paths = {subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                            check=True).stdout for flags in ([], ["-O"], ["-W", "error"], ["-X", "dev"])}
    assert len(paths) == 4


def test_a_command_its_worker_ran_before_the_handshake_ended_is_not_run_again(tmp_path, monkeypatch):
    """A fast command on a busy machine: the worker ran, answered and closed before the command process sent its
    (empty) rest of the header, whose EPIPE read as "nothing ran", and the command ran a second time, cold."""
    import socket
    import struct
    import threading

    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def server() -> None:  # what server.py does for a command that exits 3 at once
        conn, _ = listener.accept()
        with conn:
            conn.sendall(struct.pack("!I", os.getpid()))
            _, fds, _, _ = socket.recv_fds(conn, 1 << 16, warm.STREAMS)
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("!i", 3))

    real_send_fds = socket.send_fds

    def slow_send_fds(*args):  # the command process loses the CPU right after its first send
        sent = real_send_fds(*args)
        thread.join()
        return sent

    thread = threading.Thread(target=server)
    thread.start()
    monkeypatch.setattr(warm, "socket_path", lambda: path)
    monkeypatch.setattr(socket, "send_fds", slow_send_fds)
    assert warm.run(["prepare", "--params", "params.yaml"]) == 3
    listener.close()


def test_a_server_that_does_not_answer_is_named_once_and_left_for_a_new_one(tmp_path, monkeypatch, capsys):
    """A stopped or stuck server accepts into its socket's backlog and never forks: every command waited
    HANDSHAKE_S, then ran cold, without a word and for as long as the server lived."""
    import socket

    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # and never accepts: a server stuck in its imports, or stopped
    monkeypatch.setattr(warm, "socket_path", lambda: path)
    monkeypatch.setattr(warm, "HANDSHAKE_S", 1.0)
    assert warm.run(["prepare", "--params", "params.yaml"]) is None  # the command runs itself
    assert capsys.readouterr().err.splitlines() == [
        f"transferkit: the warm server did not answer within 1 s (stopped or stuck; its log: {tmp_path / 's.log'}), "
        f"so this command runs cold and the next starts a new server."]
    assert not path.exists()  # the next command starts a server of its own
    listener.close()


SLOW_IMPORT = """import os, time
deadline = time.monotonic() + 60  # a test killed midway leaves no server importing for ever
while not os.path.exists(os.environ["TKW_IMPORTED"]) and time.monotonic() < deadline:
    time.sleep(0.05)
"""
HURRIED = ("import sys; from transferkit import warm; warm.HANDSHAKE_S = 1.0; r = warm.run(sys.argv[1:]); "
           "sys.exit(100 if r is None else r)")


def test_a_server_still_importing_after_the_handshake_keeps_its_socket_and_serves_the_next_command(
        tmp_path, server_dir, monkeypatch):
    """Imports longer than HANDSHAKE_S (a slow disk, a cold cache) read as a stuck server: the command unlinked the
    socket of a server that was only importing, which then served nobody until its idle time ran out. The command
    runs cold and says so, leaves the socket, and passes the server none of its streams, whose end a reader of
    its output (`| tee`) would otherwise wait for until the server had imported."""
    fake = _fake_project(tmp_path)
    server_file = fake / "transferkit" / "warm" / "server.py"  # a server whose imports end when the test says
    server_file.write_text(server_file.read_text().replace('\nif __name__ == "__main__":',
                                                           '\nPRELOAD = ("slow_import",)\nif __name__ == "__main__":'))
    assert "slow_import" in server_file.read_text()
    (fake / "slow_import.py").write_text(SLOW_IMPORT)
    imported = tmp_path / "imported"
    monkeypatch.setenv("TKW_IMPORTED", str(imported))
    try:
        _started_server(fake, server_dir)
        env = {**os.environ, "PYTHONPATH": str(fake), "TRANSFERKIT_WARM": "1", "TMPDIR": str(server_dir)}
        with open(tmp_path / "stderr", "w") as stderr:
            client = subprocess.Popen([sys.executable, "-c", HURRIED, "exit", "7"], env=env, stdout=subprocess.PIPE,
                                      stderr=stderr)
            assert client.wait(30) == 100  # not served: it ran cold
        [log] = server_dir.glob("*/*.log")
        assert (tmp_path / "stderr").read_text().splitlines() == [
            f"transferkit: the warm server is still importing its libraries after 1 s (its log: {log}), so this "
            f"command runs cold and leaves it to the commands after it."]
        assert list(server_dir.glob("*/*.sock"))  # still the importing server's
        assert client.communicate(timeout=10)[0] == b""  # its output ended with it
    finally:
        imported.touch()
    assert _warm_client(fake, server_dir, "exit", "7").wait(60) == 7  # served by that server, now imported


def test_a_command_with_another_idle_time_gets_a_server_of_its_own(server_dir, monkeypatch):
    """A server keeps the idle time it started with: a command setting another was served by it, and its
    TRANSFERKIT_WARM_IDLE silently did nothing."""
    first = warm.socket_path()
    with monkeypatch.context() as m:
        m.setenv("TRANSFERKIT_WARM_IDLE", str(float(os.environ["TRANSFERKIT_WARM_IDLE"]) + 1))
        assert warm.socket_path() != first
        other = warm.socket_path()
        m.setenv("TRANSFERKIT_WARM_IDLE", f" {float(os.environ['TRANSFERKIT_WARM_IDLE']):.3e} ")
        assert warm.socket_path() == other  # one time written another way: the same server
    assert warm.socket_path() == first


def test_a_server_starting_while_another_binds_leaves_it_its_socket(tmp_path):
    """Two first commands start two servers: where the second probed the first between its bind and its listen,
    the probe was refused, and the second took the socket over, leaving the first orphaned for its idle time."""
    import fcntl
    import socket
    import threading

    from transferkit.warm import server

    path = tmp_path / "s.sock"
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first server, bound and not yet listening
        first.bind(str(path))
        second = threading.Thread(target=server.serve, args=(path, 1.0))
        second.start()
        second.join(0.5)
        assert second.is_alive()  # it waits for the first to listen
        first.listen(1)
    second.join(10)
    assert not second.is_alive()  # it found the first listening, and left
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(path))  # the socket at the path is still the first server's: it takes the connection
    first.settimeout(5)
    conn, _ = first.accept()
    conn.close(), probe.close(), first.close()


def test_a_signal_a_command_ignores_its_worker_ignores_too(tmp_path, server_dir):
    """`nohup transferkit ...` ignores SIGHUP: the hangup neither ends the command nor reaches its worker, which
    still ends by the SIGTERM its command passes on later."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "sleep", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert client.stdout.readline() == "ready\n"
    assert _until(lambda: _catches(client, signal.SIGTERM))
    client.send_signal(signal.SIGHUP)
    client.send_signal(signal.SIGTERM)
    assert client.wait(20) == -signal.SIGTERM


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server from /proc")
def test_a_command_whose_server_died_dies_of_the_signal_it_passed_on(tmp_path, server_dir):
    """A server gone (killed) cannot report how the worker ended: a worker that a signal the command passed on ended
    still ends its command by that signal (-15), not with exit 1."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "pid")
    worker = int(client.stdout.readline())
    server = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the worker's parent
    os.kill(server, signal.SIGKILL)
    assert _until(lambda: not Path(f"/proc/{server}").exists() or _state(server) == "Z")
    assert _until(lambda: _catches(client, signal.SIGTERM))
    client.send_signal(signal.SIGTERM)
    assert client.wait(20) == -signal.SIGTERM


def test_a_command_after_an_install_or_under_another_niceness_gets_a_server_of_its_own(server_dir, tmp_path,
                                                                                        monkeypatch):
    """An install changes a site-packages folder, whose modules a server imported before it; a worker keeps its
    server's niceness (`nice transferkit ...`): either picks another server."""
    site = tmp_path / "site-packages"
    site.mkdir()
    os.utime(site, ns=(1, 1))
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    first = warm.socket_path()
    os.utime(site, ns=(2, 2))  # a package installed or removed
    assert warm.socket_path() != first
    os.utime(site, ns=(1, 1))
    assert warm.socket_path() == first
    niceness = os.nice(0)
    monkeypatch.setattr(os, "nice", lambda increment: niceness + 1)
    assert warm.socket_path() != first


def test_a_server_idle_for_its_idle_time_gives_up_its_socket(tmp_path, server_dir, monkeypatch):
    """TRANSFERKIT_WARM_IDLE seconds with no command: the server takes no more commands (its socket goes), so an
    unused one does not hold its memory for ever."""
    monkeypatch.setenv("TRANSFERKIT_WARM_IDLE", "1")
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    assert _until(lambda: not list(server_dir.glob("*/*.sock")), 60)


def test_a_server_whose_socket_is_gone_ends(tmp_path, server_dir, monkeypatch):
    """A server stopped (SIGSTOP) past a command's handshake loses its socket: the command unlinks it for the
    next one's new server. Resumed, the old one could reach no command, yet held its memory for its idle time."""
    monkeypatch.setenv("TRANSFERKIT_WARM_IDLE", "600")
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    sock = next(server_dir.glob("*/*.sock"))
    (pid,) = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
              if b"server.py" in (line := _read(p)) and str(sock).encode() in line]
    sock.unlink()  # as a command that waited HANDSHAKE_S does

    def ended() -> bool:  # gone, or a zombie where no init reaps it
        try:
            return _state(pid) == "Z"
        except OSError:
            return True

    assert _until(ended, 30)


def test_a_served_command_has_no_transferkit_warm_in_its_environment(tmp_path, server_dir):
    """As a command run cold drops TRANSFERKIT_WARM before it runs: the processes a served one starts (DDP ranks,
    subprocesses) start no servers of their own."""
    fake = _fake_project(tmp_path)
    _started_server(fake, server_dir)
    client = _warm_client(fake, server_dir, "env", "TRANSFERKIT_WARM")
    assert client.wait(60) == 0 and client.stdout.read() == "None\n"


def test_a_server_takes_over_the_socket_a_dead_server_left(tmp_path, monkeypatch):
    """A server killed (kill -9) leaves its socket file: the next server binds that path and serves there, rather
    than leaving every later command cold."""
    import socket

    from transferkit.warm import server

    path = tmp_path / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, with no server behind it

    class Listening(Exception):
        pass

    def preload() -> None:  # the new server binds, listens, then imports: here, it stops
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            probe.connect(str(path))
        raise Listening

    monkeypatch.setattr(server, "preload", preload)
    with pytest.raises(Listening):
        server.serve(path, 1.0)
