"""Progress bars for the long steps outside training (Lightning draws its own): decoding a
dataset, scoring every model. tqdm draws only on a terminal (disable=None), so logs, CI and
tests stay clean; TQDM_DISABLE=1 turns them off everywhere."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    from tqdm import tqdm

    # an argument given wins over tqdm's TQDM_* defaults, so TQDM_DISABLE is read here
    disable = True if os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false") else None
    return iter(tqdm(items, desc=desc, unit=unit, total=total, disable=disable, leave=False, dynamic_ncols=True))
