"""One exception type for every mistake a user can make.

The CLI prints its message (which names the problem and the fix) without a traceback,
so a bad class name reads like an answer, not like a crash.
"""

import contextlib
import errno
import os
import signal
import sys


class TransferkitError(Exception):
    """A problem with the user's input: data, config or checkpoint."""


class NotPlainData(TransferkitError):
    """A file that would run code when loaded (a foreign or tampered pickle): refused, never repaired."""


def printable(text: str, keep: str = "") -> str:
    """`text` with every character a terminal acts on (an escape sequence, a newline but those in `keep`) written as
    its escape: a name from the data (a file's, a class's) cannot drive the terminal or forge a line of output."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def user_error(error: Exception) -> TransferkitError | None:
    """`error` as the one line a command ends with: itself, or an OSError of a path given that this user may not
    open, or that is too long a name, wherever it is first used (no call site need foresee it); None for any other
    error, whose traceback a bug report needs."""
    if isinstance(error, TransferkitError):
        return error
    if isinstance(error, OSError) and error.filename and error.errno in (errno.EACCES, errno.EPERM, errno.ENAMETOOLONG):
        fix = ("give a shorter path" if error.errno == errno.ENAMETOOLONG else
               "give this user access to it and the folders above it (`ls -ld` shows who may), or give another path")
        return TransferkitError(f"cannot use {error.filename} ({error.strerror}). Fix: {fix}.")
    return None


def error_line(command: str, error: Exception) -> str:
    """The one line a command ends bad input with; a newline in it stays one (dvc's output an error quotes)."""
    return f"transferkit {command}: error: {printable(str(error), keep=chr(10))}"


def die_of(signum: int) -> int:
    """End this process by `signum` as its default action would, so that a shell, and a loop around the command,
    sees the signal rather than an exit status; 128 + signum is the status to exit with where it is blocked."""
    with contextlib.suppress(OSError, ValueError):  # SIGKILL's handler cannot be set, and needs none
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum


def end_with_parent() -> None:
    """Have this process sent SIGTERM when the process that started it ends, by any signal (a stage when its dvc is
    stopped by `kill` or a CI cancel; dvc when the sweep that runs it is killed by SIGKILL): it then stops as a
    SIGTERM to it would, where an orphan would train on unseen, swap in outputs that dvc.lock does not record and
    delete the checkpoint its rerun would resume from. Linux's prctl: other systems give a child no such event."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)  # PR_SET_PDEATHSIG (1) came after the parent's end


def one_line_errors(parser, fix: str | None = None):
    """`parser` (argparse) ends a bad command line in one TransferkitError, which the command prints as its one error
    line, where argparse prints its usage block before the line; returns the parser."""
    def error(message: str):
        raise TransferkitError(f"{message}. Fix: {fix or f'see `{parser.prog} --help`'}.")

    parser.error = error
    return parser
