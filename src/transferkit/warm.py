"""`TRANSFERKIT_WARM=1`: each `transferkit` command starts in a process that has torch and Lightning
imported already.

DVC runs every stage as a process of its own, and importing torch, torchvision and Lightning is
most of a short stage's time outside training (docs/benchmarks.md measures it). With
TRANSFERKIT_WARM=1 the command hands its arguments, folder, environment and standard streams to a
server that imported those libraries once, and the server forks a worker that runs the command and
sends back its exit code. Hand-written: the standard library's forkserver serves the children of
one process only, and no kept library serves separate commands.

- The server never imports this project's code (only this module), so a worker runs the code on
  disk: an edited stage runs as edited.
- One server per user and environment: its socket lives in a folder only its user can open,
  peers of another user are refused, and the interpreter, `sys.path` (and when each folder on it
  last changed: an install), the variables that shape imports, threads and the locale, what a
  forked worker keeps from its server (CPUs, control group, niceness, groups, umask, resource
  limits) and this file pick the server; another environment gets another one.
- It serves the commands dvc.yaml runs (`transferkit STAGE --params ...` and `export`); the
  others start as usual. A command that finds no server starts one and runs itself while the
  server imports; the commands after it are served.
- It exits after TRANSFERKIT_WARM_IDLE seconds (default 600) without a command.
- Killing the command (kill -9 too) kills its worker; SIGINT, SIGTERM and SIGHUP are passed on (or
  ignored, where the command ignores them), and a worker ended by one ends its command by it too.
- It never initialises CUDA itself (a forked child could not use a CUDA the parent initialised):
  the device is set up in each worker, as in a fresh process.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOAD = ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "omegaconf", "hydra", "pydantic", "onnx",
           "onnxruntime", "onnxscript", "dvclive.lightning", "dvc.repo",
           # what the dynamo ONNX exporter imports on first use: torchlib's op table and torch.export's partitioner
           "onnxscript.function_libs.torch_lib.ops", "torch._functorch.partitioners")
# the variables that pick the server: what shapes imports and threads, and the locale, which the interpreter
# reads once at start-up (the encoding of the streams a worker opens)
SHAPES_IMPORTS = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS", "CUDA_", "TORCH", "PYTORCH", "LD_", "NCCL_", "LANG",
                  "LC_")
# set by torch in its own process the first time it uses its compiler's cache, so a script's commands
# before and after that differ in it; read at run time, from the environment the worker takes on
SET_BY_TORCH = ("TORCHINDUCTOR_CACHE_DIR",)
STREAMS = 3
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # passed from a command to its worker


def enabled() -> bool:
    wanted = os.environ.get("TRANSFERKIT_WARM", "") not in ("", "0")
    return wanted and hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")


def socket_path() -> Path:
    """This user's and this environment's server socket, in a folder only this user can open."""
    folder = Path(tempfile.gettempdir()) / f"transferkit-warm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()  # not a link someone else planted
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{folder} is not a folder private to this user")
    key = hashlib.sha256()
    for part in (sys.executable, sys.version, Path(__file__).read_text(), *sys.path,
                 *(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith(SHAPES_IMPORTS) and k not in SET_BY_TORCH)):
        key.update(part.encode() + b"\0")
    key.update(_process_traits().encode())
    for entry in sys.path:  # an install or removal changes its folder
        if os.path.isdir(entry) and os.path.basename(entry) in ("site-packages", "dist-packages"):
            key.update(str(os.stat(entry).st_mtime_ns).encode())
    path = folder / f"{key.hexdigest()[:20]}.sock"
    if len(str(path).encode()) > 100:  # a socket's address holds about 100 bytes
        raise OSError(f"{path} is too long for a socket's address")
    return path


def _process_traits() -> str:
    """What a worker keeps from its server, not from the command, and a server from the command that
    started it: the CPUs it may run on (torch sizes its thread pool by them), its control group (a
    batch job's share, which ends with the job), niceness, the groups and umask that set the owner
    and permissions of what it writes, and its resource limits (`ulimit`: memory, open files, CPU time)."""
    os.umask(mask := os.umask(0o022))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    group = Path("/proc/self/cgroup").read_text() if os.path.exists("/proc/self/cgroup") else None
    import resource

    limits = [resource.getrlimit(getattr(resource, n)) for n in sorted(dir(resource)) if n.startswith("RLIMIT_")]
    return repr((cpus, group, os.nice(0), os.getegid(), sorted(os.getgroups()), mask, limits))


# --- the command's side ---------------------------------------------------------------------------

def run(argv: list[str]) -> int | None:
    """Run `transferkit ARGV` in a worker of the warm server; None where none can be reached (the
    caller then runs the command itself). Where none runs yet, this starts one and answers None: the
    command runs here while the server imports, and the commands after it are served."""
    try:
        path = socket_path()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))  # a server still importing has bound its socket: its worker comes later
        except OSError:
            conn.close()
            _start_server(path)
            return None
    except OSError:
        return None
    # a signal this command ignores (a script's background job ignores SIGINT, nohup SIGHUP) its worker
    # ignores too, as a process started here would; the others it passes on
    ignored = [sig for sig in FORWARDED if signal.getsignal(sig) == signal.SIG_IGN]
    with conn:
        header = json.dumps({"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ),
                             "path": sys.path, "ignored": ignored}).encode()
        try:
            socket.send_fds(conn, [struct.pack("!I", len(header)) + header], list(range(STREAMS)))
            if (pid_bytes := _recv_exactly(conn, 4)) is None:
                return None  # the server went away before forking: run here
        except OSError:  # the server closed as this connected (its idle timeout; killed): nothing ran yet
            return None
        pid, passed = struct.unpack("!I", pid_bytes)[0], []

        def forward(sig: int, _frame) -> None:
            passed.append(sig)
            os.kill(pid, sig)

        # for the command's time only: a caller in this process (cli.main as a library) keeps its own handlers
        previous = {sig: signal.signal(sig, forward) for sig in set(FORWARDED) - set(ignored)}
        try:
            code = _recv_exactly(conn, 4)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    code = None if code is None else struct.unpack("!i", code)[0]
    # the worker died of the signal passed on, or ended on its KeyboardInterrupt: so does this command
    if passed and code in (None, 128 + passed[-1]):
        signal.signal(passed[-1], signal.SIG_DFL)
        os.kill(os.getpid(), passed[-1])
    if code is not None:
        return code
    print("transferkit: the warm worker ended without an exit code (killed?)", file=sys.stderr)
    return 1


def _start_server(path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRANSFERKIT_WARM"}
    with open(path.with_suffix(".log"), "ab") as log:
        # the file, not `-m`: runpy's frames at the bottom of every worker's stack have no source
        # file, and inspect.stack() then searches every loaded module for them at each call
        subprocess.Popen([sys.executable, "-P", __file__, str(path)], cwd="/", env=env, stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True)


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        if not (chunk := conn.recv(n - len(data))):
            return None
        data += chunk
    return data


# --- the server's side ----------------------------------------------------------------------------

def serve(path: Path, idle: float) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    except OSError:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            return  # another server has it
        except OSError:
            path.unlink(missing_ok=True)  # a dead server's socket
            server.bind(str(path))
        finally:
            probe.close()
    server.listen(64)
    inode = path.stat().st_ino
    preload()
    # the imported objects move out of the collector's sight: a worker's collections then leave the
    # pages it shares with the server unwritten, so they are not copied (Python's gc.freeze docs)
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    server.settimeout(idle)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            break
        if _peer_uid(conn) != os.getuid():
            conn.close()
            continue
        if os.fork() == 0:
            server.close()
            _work(conn)  # never returns
        conn.close()
    if path.exists() and path.stat().st_ino == inode:
        path.unlink()


def preload() -> None:
    """Import the libraries every command needs, and nothing of this project's. Import only, never
    compute: a worker forked after its server ran an OpenMP parallel region hangs in its first one
    (GNU libgomp's thread pool does not survive a fork)."""
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # a CUDA check while importing must not initialise CUDA
    for name in PRELOAD:
        with contextlib.suppress(Exception):  # the worker meets the same error and reports it
            importlib.import_module(name)


def _peer_uid(conn: socket.socket) -> int:
    if not hasattr(socket, "SO_PEERCRED"):
        return os.getuid()  # the socket's folder alone keeps others out
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]


def _work(conn: socket.socket) -> None:
    """In the forked worker: become the command, run it, send its exit code, exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.settimeout(None)
        conn.sendall(struct.pack("!I", os.getpid()))  # first, whatever happens next
        first, fds, _, _ = socket.recv_fds(conn, 4, STREAMS)
        size = struct.unpack("!I", first + (_recv_exactly(conn, 4 - len(first)) or b""))[0]
        header = json.loads(_recv_exactly(conn, size))
        # the command's dispositions, not those the server inherited from whatever command started it
        for sig in FORWARDED:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, signal.SIG_IGN if sig in header.get("ignored", ()) else default)
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
            os.close(fd)
        os.chdir(header["cwd"])
        os.environ.clear()
        os.environ.update({k: v for k, v in header["env"].items() if k != "TRANSFERKIT_WARM"})
        sys.path[:] = header["path"]
        # the streams as a fresh process opens them: line-buffered on a terminal, stderr always
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) or os.environ.get("PYTHONUNBUFFERED") else -1,
                          closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.argv = [header["argv0"], *header["argv"]]
        # what Lightning's DDP launcher re-runs for the other ranks: the command, not this server
        sys.modules["__main__"].__spec__ = importlib.util.find_spec("transferkit.cli")

        def watch() -> None:  # the command was killed: so is its worker
            while conn.recv(1):
                pass
            os.kill(os.getpid(), signal.SIGKILL)

        # the watcher blocks passed-on signals: one it took would wait out the main thread's blocking call
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        threading.Thread(target=watch, daemon=True).start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        from transferkit.cli import main

        try:
            code = main(header["argv"]) or 0
        except SystemExit as e:  # as the interpreter ends on it: an int is the code, anything else is printed
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:  # the interpreter prints it and dies of SIGINT: the command does (run())
            traceback.print_exc()
            code = 128 + signal.SIGINT
        atexit._run_exitfuncs()
    except BaseException:  # reported on the command's stderr, as an uncaught error would be
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a stream the command closed
                stream.flush()
        try:
            conn.sendall(struct.pack("!i", code))
        finally:
            os._exit(code & 0xFF)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(os.environ.get("TRANSFERKIT_WARM_IDLE", "600")))
    os._exit(0)  # the frozen objects are never freed: the interpreter's teardown would only report them as leaks
