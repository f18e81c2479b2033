"""Progress bars for the long steps outside training (Lightning draws its own): decoding a
dataset, scoring every model. tqdm draws only on a terminal (disable=None), so logs, CI and
tests stay clean; TQDM_DISABLE=1 turns them, and Lightning's training bar, off everywhere."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def bars_disabled() -> bool:
    """TQDM_DISABLE=1: a `disable` argument given (here, and by Lightning's training bar) wins over tqdm's
    TQDM_* defaults, so every bar reads it here."""
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    from tqdm import tqdm

    disable = True if bars_disabled() else None
    return iter(tqdm(items, desc=desc, unit=unit, total=total, disable=disable, leave=False, dynamic_ncols=True))
