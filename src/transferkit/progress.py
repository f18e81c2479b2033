"""Progress bars for the long steps outside training (Lightning draws its own): decoding a
dataset, scoring every model. tqdm draws only on a terminal (disable=None), so logs, CI and
tests stay clean; TQDM_DISABLE=1 turns them off everywhere."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, unit=unit, total=total, disable=None, leave=False, dynamic_ncols=True))
