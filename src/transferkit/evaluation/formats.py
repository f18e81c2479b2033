"""Numbers and names as the report and the tables print them."""

from __future__ import annotations

import math


def interval(lo: float, hi: float) -> str:
    """A 95% interval of an accuracy difference in points, clipped to the -100 to +100 it can be; a bound that
    is not 0 keeps digits enough not to print as 0 (the verdicts read whether the interval excludes 0)."""
    return f"{points(max(lo, -1.0))} to {points(min(hi, 1.0))}"


def points(x: float) -> str:
    """A difference of accuracies in signed points, with digits enough not to print as 0 where it is not."""
    digits = next((d for d in (1, 2, 3) if round(100 * x, d) != 0), 3) if x else 1
    return f"{100 * x:+.{digits}f}"


def millions(n: int, digits: int) -> str:
    """A count of parameters or MACs in millions where that keeps two significant digits, else as it is
    (a tiny model's 9,834 would print as 0.01 M)."""
    return f"{n / 1e6:.{digits}f} M" if n >= 10 ** (7 - digits) else f"{n:,}"


def file_size(n: int) -> str:
    """A file's bytes in MB, or in KB where MB would print a tiny model's file as 0.01."""
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} KB"


def times(ratio: float, less: str, more: str, digits: int = 2) -> str:
    """A ratio (before / after) in words: "3.90x smaller", or "1.20x larger" for 0.83 (a tiny model's
    INT8 file, whose scales and zero points outweigh the bytes its weights save; a pruned model whose
    latency rose); "not measured" where either side was not."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "not measured"
    return f"{ratio:.{digits}f}x {less}" if ratio >= 1 else f"{1 / ratio:.{digits}f}x {more}"


def measured(timing: dict, key: str, spec: str, unit: str = "") -> str:
    """A timing as `spec` formats it, or – where timing.json has none."""
    return f"{timing[key]:{spec}}{unit}" if isinstance(timing.get(key), (int, float)) else "–"


# a name from the data (a class, a dataset path) stays literal text: never a link, emphasis, an entity (&lt;),
# a tag (GitHub's preview renders some), a table cell's end or a line's
LITERAL = str.maketrans({**{c: f"\\{c}" for c in "\\`*_[]|"}, "&": "&amp;", "<": "&lt;", "\n": " ", "\r": " "})


def names(items) -> str:
    return ", ".join(str(i).translate(LITERAL) for i in items)


def busy_note(timing: dict, stage: str = "evaluate") -> list[str]:
    """Where other processes took a quarter of a core or more while `stage` timed (speed.other_work): a warning."""
    if (busy := timing.get("machine", {}).get("other_cores", 0)) < 0.25:
        return []
    # both also run by hand (evaluate into another folder, with other settings), where dvc repro times another run
    again = ("running evaluate again as it ran (the project's: `uv run dvc repro -s -f evaluate`)"
             if stage == "evaluate" else "the same command")
    return [f"While {stage} timed, other processes kept {busy:.2f} of the cores it runs on busy, so the timings may "
            f"be many times slower than this machine gives on its own, and the speed-ups between them off"
            f"{' (the one-thread timings suffer least)' * (stage == 'evaluate')}. Fix: on an idle machine, {again} "
            f"times them again."]
