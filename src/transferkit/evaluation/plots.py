"""Plots for the report (PNG): confusion matrices and training curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
matplotlib.rcParams["text.parse_math"] = False  # names from the data ("cost $5", a class) are text, never TeX
import matplotlib.pyplot as plt  # noqa: E402

from transferkit.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def confusion_png(confusion: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max(max(r) for r in confusion) or 1
    for i in range(k):
        for j in range(k):
            v = confusion[i][j]
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > top / 2 else "black")
    _save(fig, path)


def read_dvclive_series(dvclive_dir: Path, metric: str) -> tuple[list[float], list[float]]:
    """(step, value) pairs dvclive wrote for `metric`, e.g. 'val/acc'."""
    path = dvclive_dir / "plots" / "metrics" / f"{metric}.tsv"
    if not path.exists():
        return [], []
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = metric.split("/")[-1]
    return [float(r["step"]) for r in rows], [float(r[name]) for r in rows]


def curves_png(runs: dict[str, Path], path: Path) -> None:
    """Validation accuracy and training loss per epoch for every training stage."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, d in runs.items():
        for ax, metric in ((ax1, "val/acc"), (ax2, "train/loss")):
            steps, values = read_dvclive_series(d, metric)
            if values:
                ax.plot(range(1, len(values) + 1), values, label=name)
    ax1.set(title="validation accuracy", xlabel="epoch", ylabel="top-1")
    ax2.set(title="training loss", xlabel="epoch", ylabel="loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    _save(fig, path)


def pareto_png(models: dict, timing: dict, path: Path) -> None:
    """Accuracy against measured CPU latency at batch 1: the deployer's trade-off view."""
    fig, ax = plt.subplots(figsize=(6, 4))
    most = max((m["macs"] for m in models.values()), default=0) or 1  # sizes relative to the largest model's
    for name, m in models.items():
        latency = timing.get(name, {}).get("latency_ms_bs1")
        if latency is None:
            continue
        ax.scatter(latency, 100 * m["top1"], s=20 + 280 * m["macs"] / most)
        ax.annotate(name, (latency, 100 * m["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel="CPU latency at batch 1 (ms)", ylabel="top-1 (%)",
           title="accuracy vs latency (marker size grows with MACs)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def freeze_curve_png(rows: list[dict], models: dict, probe_depth: int | None, path: Path,
                     unfreeze_every: int = 0) -> None:
    """Test accuracy (with 95% intervals) against the number of frozen blocks (at the start, with gradual
    unfreezing every `unfreeze_every` epochs), with scratch and the linear probe as reference lines; the depth best
    on val is ringed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        depths = [r["freeze_depth"] for r in rows]
        top1 = [100 * r["top1"] for r in rows]
        err = [[100 * (r["top1"] - r["top1_ci95"][0]) for r in rows],
               [100 * (r["top1_ci95"][1] - r["top1"]) for r in rows]]
        ax.errorbar(depths, top1, yerr=err, marker="o", capsize=3, label="transfer (fine-tuned), test top-1")
        with_val = [r for r in rows if r.get("val_acc") is not None]
        if with_val:
            best = max(with_val, key=lambda r: r["val_acc"])
            ax.scatter([best["freeze_depth"]], [100 * best["top1"]], s=160, facecolors="none", edgecolors="k",
                       label=f"best on val (depth {best['freeze_depth']})")
        ax.set_xticks(depths)
    for name, style, label in (("scratch", "--", "scratch"),
                               ("probe", ":", f"linear probe (depth {probe_depth or 'all'})")):
        if name in models:
            ax.axhline(100 * models[name]["top1"], linestyle=style, color="grey" if name == "scratch" else "tab:red",
                       label=f"{label}: {100 * models[name]['top1']:.1f}%")
    more = f"\none more unfrozen every {unfreeze_every} epochs" if unfreeze_every else ""
    ax.set(xlabel=f"blocks frozen{' at the start' * bool(more)} (transfer.freeze_depth){more}",
           ylabel="test top-1 (%)", title="accuracy vs freeze depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def sweep_png(summary: dict, path: Path) -> bool:
    """A sweep's accuracy (mean ± std over seeds) against its swept setting, for the sweep's main
    stage; scratch and the linear probe as reference lines. Returns whether the x axis is numeric."""
    main = summary["stage"]
    rows = [r for r in summary["rows"] if r["stage"] == main]
    keys = {o.split("=", 1)[0] for r in rows for o in r["setting"]}
    numeric = len(keys) == 1 and all(len(r["setting"]) == 1 for r in rows)
    try:
        xs = [float(r["setting"][0].split("=", 1)[1]) for r in rows] if numeric else list(range(len(rows)))
    except ValueError:
        numeric, xs = False, list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    spread = [math.nan if r["test_std"] is None else 100 * r["test_std"] for r in rows]  # one seed: no bar
    line = "-" if numeric else "none"  # a line between unordered settings would draw a trend that is none
    ax.errorbar(xs, [100 * r["test_mean"] for r in rows], yerr=spread, marker="o", capsize=3, linestyle=line,
                label=f"{main}, test")
    val = [math.nan if r["val_mean"] is None else 100 * r["val_mean"] for r in rows]  # no val split: nothing drawn
    ax.plot(xs, val, marker="o", linestyle="--" if numeric else "none", alpha=0.6, label=f"{main}, val")
    for ref, colour, style in (("scratch", "k", "-"), ("probe", "g", ":")):
        for r in summary["rows"]:
            if r["stage"] == ref != main and not r["setting"]:
                ax.axhline(100 * r["test_mean"], color=colour, linestyle=style,
                           label=f"{ref}, test ({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)})")
    if numeric:
        ax.set_xlabel(next(iter(keys)))
        ax.set_xticks(xs)
    else:
        ax.set_xticks(xs, [" ".join(r["setting"]) or "default" for r in rows], rotation=30, ha="right",
                      rotation_mode="anchor")
    seeds = max(len(r["seeds"]) for r in rows)
    ax.set(ylabel="top-1 accuracy (%)", title=f"{main} sweep ({'mean ± std over seeds' if seeds > 1 else 'one seed'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return numeric
