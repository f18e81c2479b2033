"""The warm server (transferkit/warm/__init__.py says what it is for), run as a file, never imported as
part of the project by the server: it imports the libraries in PRELOAD, then forks a worker per command
that becomes the command, and reports how each worker ended."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.util
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

PRELOAD = ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "omegaconf", "hydra", "pydantic", "onnx",
           "onnxruntime", "onnxscript", "dvclive.lightning", "dvc.repo",
           # what the dynamo ONNX exporter imports on first use: torchlib's op table and torch.export's partitioner
           "onnxscript.function_libs.torch_lib.ops", "torch._functorch.partitioners")
STREAMS = 3
TICK_S = 1.0  # how often the server looks for commands gone and for its idle time
# what importing PRELOAD sets in the environment (Lightning: PYTORCH_NVML_BASED_CUDA_CHECK), which a worker
# sets again over its command's environment, as the imports of a fresh process would
SET_BY_IMPORTS: dict[str, str] = {}
# set by torch in its own process the first time it uses its compiler's cache, and only where unset: a script's
# commands before and after that differ in it (no other server for them), and a user's own value stays
SET_BY_TORCH = ("TORCHINDUCTOR_CACHE_DIR",)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # passed from a command to its worker


def recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        if not (chunk := conn.recv(n - len(data))):
            return None
        data += chunk
    return data


def serve(path: Path, idle: float) -> None:
    import fcntl

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # two servers starting at once: one binds, and the other, waiting here, probes it listening (between the
    # first's bind and listen its probe was refused, and it took over the socket of a server then orphaned)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
        before = dict(os.environ)
        # under the lock: a command that waited HANDSHAKE_S for a worker finds it held, and leaves the socket
        # to this server, still importing (a slow disk, a cold cache), rather than to a new one
        preload()
        SET_BY_IMPORTS.update({k: v for k, v in os.environ.items() if before.get(k) != v})
    # the imported objects move out of the collector's sight: a worker's collections then leave the
    # pages it shares with the server unwritten, so they are not copied (Python's gc.freeze docs)
    gc.collect()
    gc.freeze()
    server.settimeout(TICK_S)
    workers: dict[int, socket.socket] = {}  # each running worker's connection to its command

    def reap(_sig=None, _frame=None) -> None:
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if (conn := workers.pop(pid, None)) is not None:
                _report(conn, status)

    signal.signal(signal.SIGCHLD, reap)
    accepting, last = True, time.monotonic()
    while accepting or workers:
        if workers:  # the idle time counts from the end of the last command
            last = time.monotonic()
        # a command gone while its worker is stopped (Ctrl+Z, then kill -9): the worker's own watcher cannot run
        for pid, conn in list(workers.items()):
            with contextlib.suppress(OSError):  # BlockingIOError: the command is there, and quiet
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    os.kill(pid, signal.SIGKILL)
        if not accepting:
            time.sleep(TICK_S)
            continue
        try:
            conn, _ = server.accept()
        except TimeoutError:
            # its socket unlinked (by a command it did not answer, being stopped) or replaced: none can reach it
            reachable = _inode(path) == inode
            if not reachable or time.monotonic() - last >= idle:  # the running commands are still reported
                accepting = False
                if reachable:
                    path.unlink(missing_ok=True)
                server.close()
            continue
        last = time.monotonic()
        if _peer_uid(conn) != os.getuid():
            conn.close()
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # a worker that ends at once is still known
        if (pid := os.fork()) == 0:
            server.close()
            for other in workers.values():  # another command sees its worker end only when no copy of it is open
                other.close()
            _work(conn)  # never returns
        workers[pid] = conn
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _report(conn: socket.socket, status: int) -> None:
    """A worker killed by a signal (kill -9, out of memory, a crash) sent no exit code: send -signal, so
    that its command dies of the same signal."""
    with conn, contextlib.suppress(OSError):  # its command is gone too
        if os.WIFSIGNALED(status):
            conn.sendall(struct.pack("!i", -os.WTERMSIG(status)))


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
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        conn.settimeout(None)
        try:
            conn.sendall(struct.pack("!I", os.getpid()))  # first, whatever happens next
        except OSError:  # its command gave up waiting (the server was still importing, or stopped) and ran cold
            os._exit(0)
        first, fds, _, _ = socket.recv_fds(conn, 4, STREAMS)
        size = struct.unpack("!I", first + (recv_exactly(conn, 4 - len(first)) or b""))[0]
        header = json.loads(recv_exactly(conn, size))
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
        for key, value in SET_BY_IMPORTS.items():  # as a fresh process's imports would
            if key not in SET_BY_TORCH or key not in os.environ:
                os.environ[key] = value
        sys.path[:] = header["path"]
        if (mpl := sys.modules.get("matplotlib")) is not None:  # the server imported it in /: the command's own
            mpl.rc_file(mpl.matplotlib_fname())  # matplotlibrc (its folder's, MATPLOTLIBRC's), as a fresh import reads
        # the streams as a fresh process opens them: line-buffered on a terminal, stderr always, in the
        # encoding and error handling of PYTHONIOENCODING and the locale, which picked this server
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin, sys.stdout, sys.stderr = (
            open(fd, mode, buffering=buffering, closefd=False, encoding=like.encoding, errors=like.errors)
            for fd, mode, buffering, like in ((0, "r", -1, sys.__stdin__),
                                              (1, "w", 1 if os.isatty(1) or unbuffered else -1, sys.__stdout__),
                                              (2, "w", 1, sys.__stderr__)))
        for stream in (sys.stdout, sys.stderr) if unbuffered else ():
            stream.reconfigure(write_through=True)
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
            # the status the process would exit with (sys.exit(-1): 255; 143 is an exit, not SIGTERM)
            code = e.code & 0xFF if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:  # the interpreter prints it and dies of SIGINT: the command does (run())
            traceback.print_exc()
            code = -signal.SIGINT
    except BaseException:  # reported on the command's stderr, as an uncaught error would be
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):  # on every path, as the interpreter runs them
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a stream the command closed
                stream.flush()
        try:
            conn.sendall(struct.pack("!i", code))
        finally:
            os._exit(code & 0xFF)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]))  # the command's idle_seconds(), checked there
    os._exit(0)  # the frozen objects are never freed: the interpreter's teardown would only report them as leaks
