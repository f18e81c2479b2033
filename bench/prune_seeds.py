"""Pruning's accuracy over seeds: for each seed and recipe, distill the student (the distill stage),
then prune and recover it (the prune stage), and score both on the target test set as `evaluate`
does. Prints, per recipe, the pruned-minus-distilled difference per seed and its mean with a 95% t
interval over seeds (paired by seed), on the test set and on the validation set (the stages' own
val accuracy: the one to choose a recipe by), each recipe's distilled and pruned accuracy against
the first recipe's (paired by seed likewise), and the MACs reduction.

    uv run python bench/prune_seeds.py --artifacts DIR [--seeds 0 1 2] [--recipe "prune.epochs=80" ...]
                                       [--base "distill.translate=4"] [--only-done]

DIR holds a finished `prepare` and `transfer` (the teacher, for every seed) of the default
experiment. Each recipe is a space-separated list of overrides on params.yaml (Hydra syntax) for
both stages, so recipes that change only `prune.*` keys prune one and the same distilled student;
the empty recipe is the default; `--base` overrides apply to every recipe.
Runs in-process, stage after stage, into DIR/prune_seeds/seedS/: one folder per distinct
distillation setting and per distinct prune setting of each student (a rerun reuses it). The
table goes to bench/results/prune_seeds.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, conv_widths, describe, finish, machine, main_of, now, table  # noqa: E402

from transferkit.config.compose import load_params, to_params  # noqa: E402
from transferkit.plain import flatten  # noqa: E402
from transferkit.errors import TransferkitError  # noqa: E402
from transferkit.evaluation.metrics import mean_difference, predict  # noqa: E402
from transferkit.models import load_checkpoint  # noqa: E402
from transferkit.stages.common import load_task  # noqa: E402
from transferkit.stages import BY_NAME  # noqa: E402
from transferkit.stages.run import run_stage  # noqa: E402


def top1(folder: Path, stage: str, task: dict, cfg) -> float:
    model, _ = load_checkpoint(folder / "model.pt", stage, task["classes"])
    return float((predict(model, task["test_x"], cfg.evaluate.batch_size, cfg.evaluate.tta).argmax(1)
                  == task["test_y"]).float().mean())


# Settings added after runs were made, with the value that does what those runs did: left out of
# the key at that value, so the earlier runs keep their folders.
SINCE_ADDED = {"prune.scope": "layer", "prune.teacher": "transfer", "prune.rates": [], "prune.sparse_epochs": 0,
               "prune.sparse_reg": 1.0e-4, "distill.mixup": 0.0}
# Settings dropped from a stage's params since runs were made, with the value every such run had
# (prune's recovery now smooths its labels by prune.label_smoothing, 0.0 as distill's was).
SINCE_REMOVED = {"prune": {"distill.label_smoothing": 0.0}}


def settings_key(params: dict, stage: str = "prune") -> str:
    """What the stage's outputs depend on (its params in the stage table), hashed: the name of
    its folder, so that two recipes with the same settings share one run and a changed default
    never reuses a run of the old one."""
    flat = flatten(params)
    chosen = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in BY_NAME[stage].params)
              and SINCE_ADDED.get(k, object()) != v} | SINCE_REMOVED.get(stage, {})
    return hashlib.sha1(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:10]


def overrides(text: str):
    """Overrides in Hydra's syntax, split as a shell splits them (so `prune.keep=[head,blocks.0]` and
    `'prune.keep=[head, blocks.0]'` parse as they do on the command line), as a config to merge."""
    cfg = OmegaConf.create()
    for o in OverridesParser.create().parse_overrides(shlex.split(text)):
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    return cfg


def points(diffs: list[float], mean: str, lo: str, hi: str) -> dict:
    """The mean of paired differences in points and its 95% interval (none from one seed)."""
    if len(diffs) < 2:
        return {mean: 100 * diffs[0] if diffs else None, lo: None, hi: None}
    d = mean_difference(diffs)
    return {mean: 100 * d["difference"], lo: 100 * d["ci95"][0], hi: 100 * d["ci95"][1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", nargs="*", default=[""], help='e.g. "" "prune.epochs=80" "prune.steps=2"')
    ap.add_argument("--base", default="", help='overrides for every stage, e.g. "distill.translate=4"')
    ap.add_argument("--only-done", action="store_true", help="score the runs already made; train nothing")
    args = ap.parse_args(argv)
    base = load_params(ROOT / "params.yaml")
    try:  # every override merged now: a typo in the last recipe would otherwise end the run after hours
        for recipe in args.recipe:
            OmegaConf.merge(base, overrides(args.base), overrides(recipe))
    except (OmegaConfBaseException, HydraException) as e:
        raise TransferkitError(f"bad override in --base or --recipe: {' '.join(str(e).split())[:300]}. Fix: write "
                               f"them as key=value with keys params.yaml has.") from e
    task = load_task(args.artifacts / "prepare", "target")  # the inputs first, before the seconds of the peaks
    # the teacher and the task the students learn from: another transfer or prepare in DIR is another run
    made_from = hashlib.sha1(b"".join((args.artifacts / f).read_bytes()
                                      for f in ("transfer/model.pt", "prepare/target.pt"))).hexdigest()[:6]
    info = {"when": now(), "machine": machine(), "seeds": args.seeds, "recipes": args.recipe,
            "base": args.base}
    then = f", then {args.base}" if args.base else ""
    print(f"{describe(info['machine'])}\nevery stage: params.yaml's settings{then}", flush=True)
    work = args.artifacts / "prune_seeds"
    rows = []
    students = {}  # (seed, distillation settings) -> (test top-1, val top-1) of the distilled student
    for seed in args.seeds:
        cfg = OmegaConf.merge(base, {"seed": seed, "trainer": {"progress_bar": False}},
                              overrides(args.base))
        for recipe in args.recipe:
            rcfg = OmegaConf.merge(cfg, overrides(recipe))
            student_key = f"{settings_key(to_params(rcfg), 'distill')}-{made_from}"  # the student that is pruned
            distill = work / f"seed{seed}" / f"distill-{student_key}"
            inputs = {"prepare": args.artifacts / "prepare", "transfer": args.artifacts / "transfer",
                      "distill": distill}
            start = time.perf_counter()
            if not (distill / "model.pt").exists():
                if args.only_done:
                    continue
                run_stage("distill", rcfg, distill, {k: v for k, v in inputs.items() if k != "distill"})
            if (seed, student_key) not in students:
                students[seed, student_key] = (top1(distill, "distill", task, rcfg),
                                               json.loads((distill / "metrics.json").read_text())["val_acc"])
                print(f"seed {seed}: distilled {100 * students[seed, student_key][0]:.2f}% "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            distilled, distilled_val = students[seed, student_key]
            out = work / f"seed{seed}" / f"prune-{settings_key(to_params(rcfg))}-{student_key}"
            start = time.perf_counter()
            if not (out / "model.pt").exists():
                if args.only_done:
                    continue
                run_stage("prune", rcfg, out, inputs)
            m = json.loads((out / "metrics.json").read_text())
            pruned = top1(out, "prune", task, rcfg)
            rows.append({"recipe": recipe or "(default)", "seed": seed, "distilled": distilled, "pruned": pruned,
                         "distilled_val": distilled_val,
                         "difference": pruned - distilled, "val_difference": m["val_acc"] - distilled_val,
                         "macs_reduction": m.get("macs_reduction"), "macs_after": m.get("macs_after"),
                         "widths": conv_widths(load_checkpoint(out / "model.pt", "prune")[0]),
                         "seconds": time.perf_counter() - start})
            print(table(rows[-1:], COLUMNS), flush=True)
    if not rows:  # --only-done, and no run made yet for these seeds and recipes
        raise TransferkitError(f"{work} holds no pruned run of seeds {args.seeds} with these recipes to score. Fix: "
                               f"run without --only-done, which trains them.")
    summary = []
    # each recipe's models against the first recipe's on the same seeds: which recipe does better
    first = rows[0]["recipe"] if rows else None
    reference = {r["seed"]: r for r in rows if r["recipe"] == first}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        gains = {key: [] if recipe == first else [r[key] - reference[r["seed"]][key] for r in mine
                                                  if r["seed"] in reference]
                 for key in ("distilled", "pruned")}
        summary.append({"recipe": recipe, "seeds": len(mine),
                        **{key: 100 * sum(r[key] for r in mine) / len(mine)
                           for key in ("distilled_val", "distilled", "pruned")},
                        **points([r["difference"] for r in mine], "mean", "lo", "hi"),
                        **points([r["val_difference"] for r in mine], "val", "val_lo", "val_hi"),
                        **points(gains["distilled"], "dgain", "dgain_lo", "dgain_hi"),
                        **points(gains["pruned"], "gain", "gain_lo", "gain_hi"),
                        "macs_reduction": min(r["macs_reduction"] or 0 for r in mine),
                        "macs_after": max(r["macs_after"] or 0 for r in mine) / 1e6})
    print("\nper seed (top-1 as a fraction, on the target test set, evaluate's TTA):")
    print(table(rows, COLUMNS))
    print("\nmeans over seeds; pruned minus distilled in points, and each model against the first recipe's, "
          "95% t intervals paired by seed:")
    print(table(summary, [("recipe", "recipe", "s"), ("seeds", "seeds", "d"),
                          ("distilled_val", "distilled val %", ".2f"),
                          ("distilled", "distilled %", ".2f"), ("pruned", "pruned %", ".2f"), ("val", "val", "+.2f"),
                          ("val_lo", "val 95% lo", "+.2f"), ("val_hi", "val 95% hi", "+.2f"), ("mean", "test", "+.2f"),
                          ("lo", "test 95% lo", "+.2f"), ("hi", "test 95% hi", "+.2f"),
                          ("dgain", "distilled vs first", "+.2f"), ("dgain_lo", "95% lo", "+.2f"),
                          ("dgain_hi", "95% hi", "+.2f"),
                          ("gain", "pruned vs first", "+.2f"), ("gain_lo", "95% lo", "+.2f"),
                          ("gain_hi", "95% hi", "+.2f"),
                          ("macs_reduction", "MACs fewer (x)", ".2f"), ("macs_after", "MACs after (M, most)", ".1f")]))
    finish("prune_seeds", {**info, "summary": summary}, rows)
    return 0


COLUMNS = [("recipe", "recipe", "s"), ("seed", "seed", "d"), ("distilled_val", "distilled val", ".4f"),
           ("distilled", "distilled", ".4f"), ("pruned", "pruned", ".4f"),
           ("difference", "pruned - distilled", "+.4f"), ("val_difference", "same on val", "+.4f"),
           ("macs_reduction", "MACs fewer (x)", ".2f"), ("macs_after", "MACs after", ",d"),
           ("widths", "conv widths", "s"),
           ("seconds", "s", ".0f")]

if __name__ == "__main__":
    sys.exit(main_of(main))
