"""`transferkit collect DIR [DIR ...]`: the points of one or more sweeps -> one table and one
plot (accuracy against the swept setting, scratch and linear probe as reference lines).

Every run is scored again here on the target test set, the same way `evaluate` scores the
pipeline's models, so the table needs nothing the stages did not save. Choices are marked on
validation accuracy; test accuracy is reported next to it, never used to choose.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from transferkit.errors import TransferkitError
from transferkit.evaluation.metrics import paired_difference, predict
from transferkit.io import load_torch, save_json, save_text
from transferkit.sweep.points import COSMETIC, PARAMS_FILE, _flat

# Stages whose models classify the target task (pretrain's classify the source task).
TARGET_STAGES = ("transfer", "scratch", "probe", "student", "distill", "prune")
REFERENCES = ("scratch", "probe")

# Two-sided 95% quantiles of Student's t by degrees of freedom (df > 30: the normal's).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    if df > 30:
        return 1.96
    return T95[max(k for k in T95 if k <= df)]  # the next lower tabulated df: a slightly wider interval


@dataclass
class Run:
    stage: str
    folder: Path
    params: dict
    overrides: list[str]
    val_acc: float | None
    test_acc: float = math.nan
    correct: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return int(self.params.get("seed", 0))

    @property
    def setting(self) -> tuple[str, ...]:
        """What distinguishes this point from the others, apart from its seed."""
        return tuple(o for o in self.overrides if _override_key(o) != "seed")

    @property
    def label(self) -> str:
        return " ".join([self.stage, *self.setting])


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[1] if "@" in key else key  # model@distill.student=... sets distill.student


def _load_run(model_file: Path) -> Run | None:
    folder = model_file.parent
    stage, job = folder.name, folder.parent
    if stage not in TARGET_STAGES:
        return None
    if (folder / PARAMS_FILE).exists():
        params = yaml.safe_load((folder / PARAMS_FILE).read_text())
    elif (job / ".hydra" / "config.yaml").exists():
        params = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    else:
        raise TransferkitError(f"{folder} has a model but no {PARAMS_FILE} or .hydra/config.yaml saying "
                               f"how it was made. Fix: rerun that point, or move it out of the sweep folder.")
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    overrides = [o for o in overrides if _override_key(o) not in COSMETIC and not o.startswith("paths.")]
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {}
    return Run(stage, folder, params, overrides, metrics.get("val_acc"))


def find_runs(dirs: list[Path]) -> list[Run]:
    runs = []
    for d in dirs:
        if not d.is_dir():
            raise TransferkitError(f"{d} is not a folder. Fix: pass the sweep folder (hydra.sweep.dir, by "
                                   f"default multirun/<experiment>).")
        for model_file in sorted(d.rglob("model.pt")):
            if any(part.startswith(".") for part in model_file.relative_to(d).parts):
                continue  # a stage's unfinished work folder
            run = _load_run(model_file)
            if run is not None:
                runs.append(run)
    if not runs:
        raise TransferkitError(f"no finished runs under {', '.join(map(str, dirs))}. Fix: run a sweep first, "
                               f"e.g. `transferkit transfer -m transfer.freeze_depth=0,1,2`.")
    # An override every run shares (experiment=smoke on each command) sweeps nothing.
    common = set.intersection(*(set(r.overrides) for r in runs))
    for r in runs:
        r.overrides = [o for o in r.overrides if o not in common]
    return runs


def check_same_config(runs: list[Run]) -> None:
    """Runs may differ only in what their overrides changed; anything else means the folders
    hold sweeps of different configs, whose numbers must not share a table."""
    swept = {_override_key(o) for r in runs for o in r.overrides}
    if "experiment" in swept:
        raise TransferkitError("the runs sweep over experiment=..., so they score different test sets. "
                               "Fix: collect each experiment's sweep folder on its own.")

    def free(key: str) -> bool:
        return key in COSMETIC or any(key == s or key.startswith(s + ".") for s in swept)

    first = runs[0]
    base = dict(_flat(first.params))
    for run in runs[1:]:
        flat = dict(_flat(run.params))
        for key in sorted(set(base) | set(flat)):
            if not free(key) and base.get(key, "<missing>") != flat.get(key, "<missing>"):
                raise TransferkitError(
                    f"{run.folder} was made with {key}={flat.get(key, '<missing>')!r} but {first.folder} with "
                    f"{key}={base.get(key, '<missing>')!r}, and no sweep override changed {key}: these runs come "
                    f"from different configs. Fix: collect each sweep folder on its own, or rerun the points "
                    f"with the same conf/.")


def score(runs: list[Run], cache_file: Path | None = None) -> None:
    """Top-1 of every run on the target test set it was trained for. Per-image results are
    cached by model and test-set file stamps, so collecting a growing sweep again only scores
    the new points."""
    from transferkit.models import load_checkpoint

    from transferkit.io import load_plain

    cache = load_plain(cache_file, f"delete {cache_file} (a cache: collect rebuilds it).") \
        if cache_file and cache_file.exists() else {}
    tasks: dict[Path, dict] = {}
    for run in runs:
        task_file = Path(run.params["paths"]["artifacts_dir"]) / "prepare" / "target.pt"
        stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in (run.folder / "model.pt", task_file))
        key = f"{run.folder.resolve()}|{stamp}|{run.params.get('evaluate')}"
        if key in cache:
            run.correct = cache[key]
            run.test_acc = float(run.correct.float().mean())
            continue
        if task_file not in tasks:
            tasks[task_file] = load_torch(task_file, "prepared target task", "prepare")
        task = tasks[task_file]
        model, ckpt = load_checkpoint(run.folder / "model.pt", run.stage)
        if list(ckpt["classes"]) != list(task["classes"]):
            raise TransferkitError(f"{run.folder / 'model.pt'} classifies {ckpt['classes']} but {task_file} holds "
                                   f"{task['classes']}. Fix: collect from the project the sweep ran in.")
        tta = run.params.get("evaluate", {}).get("tta", "flip")
        batch = int(run.params.get("evaluate", {}).get("batch_size", 1000))
        pred = predict(model, task["test_x"], batch, tta).argmax(1)
        run.correct = (pred == task["test_y"])
        run.test_acc = float(run.correct.float().mean())
        cache[key] = run.correct
    if cache_file:
        from transferkit.io import save_torch

        save_torch(cache, cache_file)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def versus(group: list[Run], baseline: list[Run]) -> dict | None:
    """Test accuracy of `group` minus `baseline` with a 95% interval. With two or more seeds
    in both, pair by seed and use the spread across seeds (it includes training noise);
    otherwise pair image by image (only test-set noise: say so)."""
    if not baseline:
        return None
    by_seed = {r.seed: r for r in baseline}
    pairs = [(r, by_seed[r.seed]) for r in group if r.seed in by_seed]
    if len(pairs) >= 2:
        diffs = [a.test_acc - b.test_acc for a, b in pairs]
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        half = t95(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        return {"difference": mean, "ci95": [mean - half, mean + half], "pairs": len(diffs),
                "method": f"paired by seed over {len(diffs)} seeds (t interval)"}
    a = torch.stack([r.correct.float() for r in group]).mean(0)
    b = torch.stack([r.correct.float() for r in baseline]).mean(0)
    d = paired_difference(a, b)
    return {"difference": d["difference"], "ci95": d["ci95"], "pairs": 1,
            "method": "paired by image (one seed: test-set noise only)"}


def summarize(runs: list[Run]) -> dict:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.stage, run.setting)].append(run)
    refs = {stage: [r for r in runs if r.stage == stage and not r.setting] for stage in REFERENCES}
    rows = []
    for (stage, setting), group in sorted(groups.items(), key=lambda kv: (TARGET_STAGES.index(kv[0][0]), _sort_key(kv[0][1]))):
        val_mean, val_std = _mean_std([r.val_acc for r in group])
        test_mean, test_std = _mean_std([r.test_acc for r in group])
        row = {"stage": stage, "setting": list(setting), "label": group[0].label,
               "seeds": sorted(r.seed for r in group), "val_mean": val_mean, "val_std": val_std,
               "test_mean": test_mean, "test_std": test_std,
               "runs": [{"folder": str(r.folder), "seed": r.seed, "val_acc": r.val_acc, "test_acc": r.test_acc}
                        for r in sorted(group, key=lambda r: r.seed)]}
        if stage != "scratch":
            row["vs_scratch"] = versus(group, refs["scratch"])
        rows.append(row)
    main = _main_stage(rows)
    candidates = [r for r in rows if r["stage"] == main and not math.isnan(r["val_mean"])]
    best = max(candidates, key=lambda r: r["val_mean"], default=None)
    for r in rows:
        r["chosen_on_val"] = r is best
    return {"stage": main, "rows": rows, "swept": sorted({_override_key(o) for r in runs for o in r.overrides})}


def _main_stage(rows: list[dict]) -> str:
    """The stage the sweep is about: transfer if it is there, else the one with most points."""
    stages = [r["stage"] for r in rows]
    if "transfer" in stages:
        return "transfer"
    swept = [s for s in stages if s not in REFERENCES] or stages
    return max(set(swept), key=swept.count)


def _sort_key(setting: tuple[str, ...]):
    """Numeric values sort as numbers (freeze_depth=10 after 9)."""
    out = []
    for o in setting:
        value = o.split("=", 1)[1] if "=" in o else o
        try:
            out.append((0, float(value), ""))
        except ValueError:
            out.append((1, 0.0, value))
    return tuple(out)


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def table_markdown(summary: dict) -> str:
    lines = ["| run | seeds | val top-1 % (mean ± std) | test top-1 % (mean ± std) | test − scratch, points (95% interval) | beats scratch? |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        vs = r.get("vs_scratch")
        if vs:
            lo, hi = vs["ci95"]
            diff = f"{100 * vs['difference']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"
            verdict = "yes" if lo > 0 else ("no: worse" if hi < 0 else "not shown (interval includes 0)")
        else:
            diff, verdict = "–", "–"
        star = " ← best on val" if r["chosen_on_val"] else ""
        lines.append(f"| {r['label']}{star} | {len(r['seeds'])} | {_pct(r['val_mean'])} ± {_pct(r['val_std'])} | "
                     f"{_pct(r['test_mean'])} ± {_pct(r['test_std'])} | {diff} | {verdict} |")
    methods = sorted({r["vs_scratch"]["method"] for r in summary["rows"] if r.get("vs_scratch")})
    notes = [f"Intervals: {m}." for m in methods]
    return "\n".join(lines + [""] + notes) + "\n"


def plot(summary: dict, path: Path) -> bool:
    """Accuracy against the swept setting of the transfer runs; scratch and probe as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = summary["stage"]
    rows = [r for r in summary["rows"] if r["stage"] == main]
    keys = {o.split("=", 1)[0] for r in rows for o in r["setting"]}
    numeric = len(keys) == 1 and all(len(r["setting"]) == 1 for r in rows)
    try:
        xs = [float(r["setting"][0].split("=", 1)[1]) for r in rows] if numeric else list(range(len(rows)))
    except ValueError:
        numeric, xs = False, list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(xs, [100 * r["test_mean"] for r in rows], yerr=[100 * r["test_std"] for r in rows],
                marker="o", capsize=3, label=f"{main}, test")
    ax.plot(xs, [100 * r["val_mean"] for r in rows], "o--", alpha=0.6, label=f"{main}, val")
    for ref, style in (("scratch", "k-"), ("probe", "g:")):
        for r in summary["rows"]:
            if r["stage"] == ref != main and not r["setting"]:
                ax.axhline(100 * r["test_mean"], color=style[0], linestyle=style[1:],
                           label=f"{ref}, test ({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)})")
    if numeric:
        ax.set_xlabel(next(iter(keys)))
        ax.set_xticks(xs)
    else:
        ax.set_xticks(xs, [" ".join(r["setting"]) or "default" for r in rows], rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{main} sweep (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from transferkit.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return numeric


def collect(dirs: list[Path], out: Path) -> dict:
    runs = find_runs(dirs)
    check_same_config(runs)
    out.mkdir(parents=True, exist_ok=True)
    score(runs, out / "scores.pt")
    summary = summarize(runs)
    save_json(summary, out / "sweep.json")
    save_text(table_markdown(summary), out / "sweep.md")
    plot(summary, out / "sweep.png")
    return summary


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="transferkit collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="sweep folders (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, help="where to write sweep.md/.json/.png (default DIR/collected)")
    args = parser.parse_args(argv)
    if not args.dirs:
        raise TransferkitError("collect needs a sweep folder. Fix: `transferkit collect multirun/<experiment>`.")
    out = args.out or args.dirs[0] / "collected"
    summary = collect(args.dirs, out)
    print(table_markdown(summary))
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0
