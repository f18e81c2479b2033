"""Plots for the report (PNG): confusion matrices and training curves."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
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
    for name, m in models.items():
        latency = timing.get(name, {}).get("latency_ms_bs1")
        if latency is None:
            continue
        ax.scatter(latency, 100 * m["top1"], s=20 + m["macs"] / 2e6)
        ax.annotate(name, (latency, 100 * m["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel="CPU latency at batch 1 (ms)", ylabel="top-1 (%)",
           title="accuracy vs latency (marker size ~ MACs)")
    ax.grid(alpha=0.3)
    _save(fig, path)
