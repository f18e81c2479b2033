"""`TRANSFERKIT_WARM=1`: each `transferkit` command starts in a process that has torch and Lightning
imported already.

DVC runs every stage as a process of its own, and importing torch, torchvision and Lightning is
most of a short stage's time outside training (docs/benchmarks.md measures it). With
TRANSFERKIT_WARM=1 the command hands its arguments, folder, environment and standard streams to a
server that imported those libraries once, and the server forks a worker that runs the command and
sends back its exit code. Hand-written: the standard library's forkserver serves the children of
one process only, and no kept library serves separate commands.

- The server never imports this project's code (it runs warm/server.py as a file), so a worker runs
  the code on disk: an edited stage runs as edited.
- One server per user and environment: its socket lives in a folder only its user can open,
  peers of another user are refused, and the interpreter, `sys.path` (and when each folder on it
  last changed: an install), the variables that shape imports, threads and the locale, what a
  forked worker keeps from its server (CPUs, control group, niceness, groups, umask, resource
  limits), the two files of this package and TRANSFERKIT_WARM_IDLE pick the server; another environment
  gets another one.
- It serves the commands dvc.yaml runs (`transferkit STAGE --params ...` and `export`); the
  others start as usual. A command that finds no server starts one and runs itself while the
  server imports; the commands after it are served.
- After TRANSFERKIT_WARM_IDLE seconds (default 600) with no command running it takes no more, and it exits
  once the workers still running have ended.
- Killing the command (kill -9 too) kills its worker; SIGINT, SIGTERM and SIGHUP are passed on (or
  ignored, where the command ignores them), Ctrl+Z (SIGTSTP) stops the worker with its command and
  SIGCONT resumes both (SIGSTOP, which no process can catch, stops the command only), and a worker
  ended by a signal (passed on, or any other: kill -9, out of memory) ends its command by it too.
- A server that has not forked a worker within HANDSHAKE_S leaves the command to run itself, and says
  so: one still importing (it holds its start-up lock until it has) keeps its socket for the commands
  after it; one stopped or stuck gives it up, and the next command starts a new server.
- It never initialises CUDA itself (a forked child could not use a CUDA the parent initialised):
  the device is set up in each worker, as in a fresh process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import tempfile
from pathlib import Path

from transferkit.errors import die_of
from transferkit.training import RANK_VARIABLES, first_process
from transferkit.warm import server
from transferkit.warm.server import FORWARDED, SET_BY_TORCH, STREAMS, recv_exactly

# the variables that pick the server: what shapes imports and threads, the locale and the time zone, which
# the interpreter reads once at start-up (the encoding of the streams a worker opens), and what the libraries
# it imports read once on import (tqdm's defaults, matplotlib's backend, dvclive's log level, numpy's and
# protobuf's options, torch's compiler settings, the rank Lightning logs as)
SHAPES_IMPORTS = ("PYTHON", "OMP_", "GOMP_", "MKL_", "KMP_", "OPENBLAS", "CUDA_", "TORCH", "PYTORCH", "LD_", "NCCL_",
                  "LANG", "LC_", "TZ", "TQDM_", "MPL", "DVCLIVE_", "NPY_", "PROTOCOL_BUFFERS", "INDUCTOR_",
                  "AOT_INDUCTOR", "POSSIBLE_USER_WARNINGS", *RANK_VARIABLES, "SLURM_", "CI")
HANDSHAKE_S = 30.0  # a server that has not forked a worker by then is still importing, stopped or stuck


def enabled() -> bool:
    """TRANSFERKIT_WARM=1, on a system that can serve, in a first process: the ranks a DDP launcher starts
    run as it starts them."""
    if (value := os.environ.get("TRANSFERKIT_WARM", "")) not in ("", "0", "1"):
        print(f"transferkit: TRANSFERKIT_WARM={value} is neither 1 nor 0, so no warm server serves. Fix: set it to 1 "
              f"(on) or 0 (off).", file=sys.stderr)
    return (value == "1" and first_process() and hasattr(os, "fork") and hasattr(socket, "AF_UNIX")
            and hasattr(socket, "send_fds") and idle_seconds() is not None)


def idle_seconds() -> float | None:
    """TRANSFERKIT_WARM_IDLE (600 by default); None, said in one line, where it is no number of seconds > 0."""
    text = os.environ.get("TRANSFERKIT_WARM_IDLE") or "600"  # set but empty, as TRANSFERKIT_WARM: the default
    try:
        if (idle := float(text)) > 0:
            return idle
    except ValueError:
        pass
    print(f"transferkit: TRANSFERKIT_WARM_IDLE={text} is no number of seconds > 0, so no warm server starts. Fix: "
          f"unset it or set a number such as 600.", file=sys.stderr)
    return None


def socket_path() -> Path:
    """This user's and this environment's server socket, in a folder only this user can open."""
    folder = Path(tempfile.gettempdir()) / f"transferkit-warm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()  # not a link someone else planted
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{folder} is not a folder private to this user (mode 700, owned by it). Fix: remove it, or "
                      f"set TMPDIR to a folder of your own")
    key = hashlib.sha256()
    # a server keeps the idle time it started with: a command that sets another gets a server of its own
    for part in (str(idle_seconds()), sys.executable, sys.version, *interpreter_flags(),
                 Path(__file__).read_text(), Path(server.__file__).read_text(), *sys.path,
                 *(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith(SHAPES_IMPORTS) and k not in SET_BY_TORCH)):
        key.update(part.encode() + b"\0")
    key.update(_process_traits().encode())
    for entry in sys.path:  # an install or removal changes its folder
        if os.path.isdir(entry) and os.path.basename(entry) in ("site-packages", "dist-packages"):
            key.update(str(os.stat(entry).st_mtime_ns).encode())
    path = folder / f"{key.hexdigest()[:20]}.sock"
    if len(str(path).encode()) > 100:  # a socket's address holds about 100 bytes
        raise OSError(f"{path} is too long for a socket's address. Fix: set TMPDIR to a shorter path")
    return path


def interpreter_flags() -> list[str]:
    """This interpreter's options (-O, -W, -X, ...) as a command line: a server started with them serves
    commands started with them (multiprocessing starts its children the same way)."""
    import subprocess

    return subprocess._args_from_interpreter_flags()


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
    except OSError as e:  # the command runs cold, and says why
        print(f"transferkit: TRANSFERKIT_WARM=1, but no warm server can serve: {e}.", file=sys.stderr)
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(HANDSHAKE_S)
        try:
            inode = path.stat().st_ino
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
        try:
            # the worker's pid first, then the command: one that gives up waiting (below) has sent the server
            # none of its streams, which would stay open in the server's backlog, and a reader of its output
            # (`| tee`, a CI log) would wait for their end as long as the server imports or is stuck
            if (pid_bytes := recv_exactly(conn, 4)) is None:
                return None  # the server went away before forking: run here
        except TimeoutError:
            return _unanswered(path, inode)
        except OSError:  # closed as this connected (its idle timeout; killed): nothing ran
            return None
        header = json.dumps({"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ),
                             "path": sys.path, "ignored": ignored}).encode()
        try:
            message = struct.pack("!I", len(header)) + header
            # one send takes what fits in the socket's buffer: the rest of a large environment follows (only
            # then: a worker that took it all may have ended, and a send to its closed socket fails, after it ran)
            if (sent := socket.send_fds(conn, [message], list(range(STREAMS)))) < len(message):
                conn.sendall(message[sent:])
        except OSError:  # the worker ended before it had the whole command: nothing ran
            return None
        conn.settimeout(None)
        pid, passed = struct.unpack("!I", pid_bytes)[0], []

        def forward(sig: int, _frame) -> None:
            passed.append(sig)
            os.kill(pid, sig)

        def stop(_sig: int, _frame) -> None:  # Ctrl+Z: the worker is in no terminal's process group
            os.kill(pid, signal.SIGSTOP)
            signal.signal(signal.SIGTSTP, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTSTP)  # stops here until `fg` or `bg`; an orphaned group discards it
            os.kill(pid, signal.SIGCONT)
            signal.signal(signal.SIGTSTP, stop)

        def resume(_sig: int, _frame) -> None:
            os.kill(pid, signal.SIGCONT)

        # for the command's time only: a caller in this process (cli.main as a library) keeps its own handlers
        handlers = {**{sig: forward for sig in set(FORWARDED) - set(ignored)}, signal.SIGCONT: resume}
        if signal.getsignal(signal.SIGTSTP) == signal.SIG_DFL:
            handlers[signal.SIGTSTP] = stop
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            code = _wait_for_code(conn)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    # the status the worker exits with, or the signal it dies of (-signal: the server saw it die, or the
    # worker's KeyboardInterrupt); the command ends the same way
    code = None if code is None else struct.unpack("!i", code)[0]
    if passed and code is None:  # the server went away with the worker a passed-on signal ended
        code = -passed[-1]
    if code is not None and code < 0:
        return die_of(-code)
    if code is not None:
        return code
    print("transferkit: the warm worker ended without an exit code", file=sys.stderr)
    return 1


def _unanswered(path: Path, inode: int) -> None:
    """No worker within HANDSHAKE_S. A server holds its start-up lock until it has imported: one that holds it
    is still importing (a slow disk, a cold cache) and keeps its socket for the commands after this one; one
    that holds it no more is stopped or stuck, and every later command would wait as long, without a word."""
    import fcntl

    log = path.with_suffix(".log")
    with open(path.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"transferkit: the warm server is still importing its libraries after {HANDSHAKE_S:.0f} s (its "
                  f"log: {log}), so this command runs cold and leaves it to the commands after it.",
                  file=sys.stderr)
            return None
        # under the lock: no server starting binds this path as its stuck server's socket goes
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:  # its socket still: the next command starts a new server
                path.unlink()
    print(f"transferkit: the warm server did not answer within {HANDSHAKE_S:.0f} s (stopped or stuck; its log: "
          f"{log}), so this command runs cold and the next starts a new server.", file=sys.stderr)
    return None


def _wait_for_code(conn: socket.socket) -> bytes | None:
    """The worker's exit code (4 bytes), or None where the connection closed first. A signal's handler runs
    between bytecodes, so one that came as a blocking recv() began (or that another thread took) would wait for
    the worker to end; the signal module's wakeup socket (as asyncio uses it) wakes the selector for it instead
    (epoll or poll: select() takes no descriptor past 1023, and a caller may hold more files)."""
    wake, woken = socket.socketpair()
    with wake, woken, selectors.DefaultSelector() as selector:
        wake.setblocking(False)
        woken.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
        selector.register(woken, selectors.EVENT_READ)
        previous = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
        try:
            data = b""
            while len(data) < 4:
                ready = {key.fileobj for key, _ in selector.select()}
                if woken in ready:  # the handlers ran as the selector returned
                    with contextlib.suppress(BlockingIOError):
                        woken.recv(256)
                if conn in ready:
                    if not (chunk := conn.recv(4 - len(data))):
                        return None
                    data += chunk
            return data
        finally:
            signal.set_wakeup_fd(previous)


def _start_server(path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRANSFERKIT_WARM"}
    with open(path.with_suffix(".log"), "ab") as log:
        # the file, not `-m`: runpy's frames at the bottom of every worker's stack have no source
        # file, and inspect.stack() then searches every loaded module for them at each call
        subprocess.Popen([sys.executable, *interpreter_flags(), "-P", server.__file__, str(path), str(idle_seconds())],
                         cwd="/", env=env,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
