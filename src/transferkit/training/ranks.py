"""The processes of a fit under DDP: a SIGTERM ends every rank at once, and a collective that lost a rank says which
rank ended and how."""

from __future__ import annotations

import os
import signal
import threading
import time

from pytorch_lightning.callbacks import Callback

from transferkit.errors import die_of


class DieOnSigterm(Callback):
    """Under several processes, a SIGTERM ends every rank at once. Lightning's handler broadcasts the signal to the
    other ranks from inside the handler, while they wait in another collective: both hang until the process group
    times out (30 minutes). The pair of the last checkpoint is whole at any moment, so the next run resumes."""

    started: list = []  # the ranks Lightning's launcher started in this process's first fit: later fits start none

    def setup(self, trainer, module, stage: str) -> None:  # before the first step: a rank may end at any point
        if procs := getattr(trainer.strategy.launcher, "procs", None):
            hold_observer(procs)

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


def hold_observer(procs: list, grace_s: float = 30.0) -> None:
    """Lightning's launcher watches the ranks it started from a thread which, within 5 s of one ending, SIGKILLs them
    all and this process, at times before this process's collective fails and it can say which rank ended (fit, in
    trainer.py). Held, that thread waits `grace_s` first: a process that has reported and ended takes the thread with
    it, and one whose collective hangs (a backend that does not notice a lost peer) is still ended."""
    for thread in threading.enumerate():
        # held once: a stage's later fit meets the thread of its first while those ranks run
        if getattr(thread, "_child_processes", None) is procs and "_terminate_all" not in vars(thread):
            def later(terminate=thread._terminate_all) -> None:
                time.sleep(grace_s)
                terminate()

            thread._terminate_all = later


def ended_rank(parent: int, wait_s: float = 2.0) -> str | None:
    """Which rank of the fit has ended, and how: one Lightning's launcher started in this process (given `wait_s` to
    be reaped), or, in a rank it started, rank 0, its parent (`parent` at the start). None: all run."""
    deadline = time.monotonic() + wait_s
    while DieOnSigterm.started:
        for rank, proc in enumerate(DieOnSigterm.started, start=1):
            if (code := proc.poll()) is not None:
                return f"rank {rank} of the fit " + (f"was killed by signal {-code} ({signal.strsignal(-code)})"
                                                     if code < 0 else f"exited with status {code}")
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    # a killed rank 0's sockets close before its children pass to another parent: the collective fails first
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.05)
    return "rank 0 of the fit ended" if os.getppid() != parent else None
