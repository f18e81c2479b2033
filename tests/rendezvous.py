"""A Hydra callback for the launcher tests: each job waits at its start until `parties` jobs have
started, then notes whether they all had, in a file named by its pid. Jobs that ran at the same time
all note "met" (timings of short jobs cannot show that on a busy 2-core machine). Hydra turns a
callback's exception into a warning, so the notes, not an exception, carry the answer."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback


class Rendezvous(Callback):
    def __init__(self, folder: str, parties: int = 2, timeout_s: float = 120.0) -> None:
        self.folder, self.parties, self.timeout_s = Path(folder), parties, timeout_s

    def on_job_start(self, config, **kwargs) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        note = self.folder / str(os.getpid())
        note.write_text("waiting")
        deadline = time.monotonic() + self.timeout_s
        while len(list(self.folder.iterdir())) < self.parties and time.monotonic() < deadline:
            time.sleep(0.05)
        note.write_text("met" if len(list(self.folder.iterdir())) >= self.parties else "alone")
