"""Lightning's plumbing around each hook call, trimmed: it runs dozens of times a training step, so its Python calls
are a large part of the loop's host time (bench/host_overhead.py counts them)."""

from __future__ import annotations

import contextlib

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.profilers import PassThroughProfiler


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler records nothing, yet enters a generator-based context manager
    (about ten Python calls) around every hook call, dozens of times a training step; this one
    enters a reusable null context."""

    _null = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return self._null


# called on every callback and on the module at each training step, each call in a profiler context with a name
# built for it (the validation loop's batch hooks are not here: it reads their signatures as each epoch's pass starts)
STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")


@contextlib.contextmanager
def no_empty_hooks(module: pl.LightningModule, callbacks: list[Callback]):
    """For the fit, each of STEP_HOOKS that `module` or a callback inherits as its base class's no-op is None:
    Lightning skips a hook that is not callable, and with it the profiler context and the name it builds for it."""
    muted = [(o, name) for o in (module, *callbacks) for name in STEP_HOOKS
             if getattr(type(o), name) is getattr(pl.LightningModule if o is module else Callback, name)]
    for o, name in muted:
        object.__setattr__(o, name, None)  # nn.Module's own __setattr__ would check it for a parameter
    try:
        yield
    finally:
        for o, name in muted:
            del o.__dict__[name]
