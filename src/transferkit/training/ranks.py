"""The processes of a fit under DDP: a SIGTERM ends every rank at once, and a collective that lost a rank says which
rank ended and how."""

from __future__ import annotations

import os
import signal
import sys
import time

from pytorch_lightning.callbacks import Callback

from transferkit.errors import TransferkitError, die_of, error_line


class DieOnSigterm(Callback):
    """Under several processes, a SIGTERM ends every rank at once. Lightning's handler broadcasts the signal to the
    other ranks from inside the handler, while they wait in another collective: both hang until the process group
    times out (30 minutes). The pair of the last checkpoint is whole at any moment, so the next run resumes."""

    started: list = []  # the ranks Lightning's launcher started in this process's first fit: later fits start none

    def __init__(self):
        watch_ranks()

    def on_train_start(self, trainer, module) -> None:  # after Lightning installed its handlers
        if trainer.world_size > 1:
            if procs := getattr(trainer.strategy.launcher, "procs", None):
                DieOnSigterm.started[:] = procs
            signal.signal(signal.SIGTERM, DieOnSigterm.die)

    @staticmethod
    def die(signum, frame) -> None:
        for proc in DieOnSigterm.started:
            proc.send_signal(signum)  # a no-op for one that has ended
        die_of(signum)  # exit status 143, as a shell reports a SIGTERM


def watch_ranks(grace_s: float = 30.0) -> None:
    """Lightning's launcher watches the ranks it started from a thread which, within 5 s of one ending, SIGKILLs them
    all and this process, without a word. In a fit, this process's collective fails and says which rank ended (fit,
    in trainer.py): the thread waits `grace_s` first, and still ends a process whose collective hangs (a backend that
    does not notice a lost peer). Before it (a rank killed while it starts, out of memory) this process waits for
    the rank to join the process group, where nothing fails: the thread says which rank ended, in the command's one
    error line, and ends the ranks and this process with exit status 2, as any error does."""
    from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    lightning = getattr(_ChildProcessObserver._terminate_all, "lightning", _ChildProcessObserver._terminate_all)

    def end(observer) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # the process group is made: a collective fails
            time.sleep(grace_s)  # a process that has reported and ended takes the thread with it
            return lightning(observer)
        dead = next((_how(rank, p.returncode) for rank, p in enumerate(observer._child_processes, start=1)
                     if p.returncode), "a rank of the fit ended")
        command = sys.argv[1] if len(sys.argv) > 1 else "stage"  # `python -m transferkit.cli STAGE ...`
        print(error_line(command, TransferkitError(f"{dead} while the fit started. Fix: run the stage again (if memory "
                                                   f"ran out, lower its batch_size or trainer.devices).")),
              file=sys.stderr, flush=True)
        for proc in observer._child_processes:
            proc.kill()
        os._exit(2)

    end.lightning = lightning
    _ChildProcessObserver._terminate_all = end  # once per process: DieOnSigterm's every fit calls this again


def _how(rank: int, code: int) -> str:
    return f"rank {rank} of the fit " + (f"was killed by signal {-code} ({signal.strsignal(-code)})" if code < 0
                                         else f"exited with status {code}")


def ended_rank(parent: int, wait_s: float = 2.0) -> str | None:
    """Which rank of the fit has ended, and how: one Lightning's launcher started in this process (given `wait_s` to
    be reaped), or, in a rank it started, rank 0, its parent (`parent` at the start). None: all run."""
    deadline = time.monotonic() + wait_s
    while DieOnSigterm.started:
        for rank, proc in enumerate(DieOnSigterm.started, start=1):
            if (code := proc.poll()) is not None:
                return _how(rank, code)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    # a killed rank 0's sockets close before its children pass to another parent: the collective fails first
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.05)
    return "rank 0 of the fit ended" if os.getppid() != parent else None
