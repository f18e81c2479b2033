"""Pruning's accuracy over seeds: for each seed, distill the student (the distill stage), then prune
and recover it with each recipe given (the prune stage), and score both on the target test set as
`evaluate` does. Prints, per recipe, the pruned-minus-distilled difference per seed and its mean
with a 95% t interval over seeds (paired by seed), and the MACs reduction.

    uv run python bench/prune_seeds.py --artifacts DIR [--seeds 0 1 2] [--recipe "prune.epochs=80" ...]

DIR holds a finished `prepare` and `transfer` (the teacher) of the default experiment. Each
recipe is a space-separated list of overrides on params.yaml; the empty recipe is the default.
Runs in-process, stage after stage; outputs go to DIR/prune_seeds/ and bench/results/prune_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, now, save, table  # noqa: E402

from transferkit.config.compose import load_params  # noqa: E402
from transferkit.evaluation.metrics import mean_difference, predict  # noqa: E402
from transferkit.models import load_checkpoint  # noqa: E402
from transferkit.stages.common import load_task  # noqa: E402
from transferkit.stages.run import run_stage  # noqa: E402
from transferkit.training.precision import cpu_matmul  # noqa: E402


def top1(folder: Path, stage: str, task: dict, cfg) -> float:
    model, _ = load_checkpoint(folder / "model.pt", stage, task["classes"])
    return float((predict(model, task["test_x"], cfg.evaluate.batch_size, cfg.evaluate.tta).argmax(1)
                  == task["test_y"]).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", nargs="*", default=[""], help='e.g. "" "prune.epochs=80" "prune.steps=2"')
    args = ap.parse_args(argv)
    info = {"when": now(), "machine": machine(), "matmul": cpu_matmul(), "seeds": args.seeds, "recipes": args.recipe}
    print(f"{info['machine']['cpu']}; matmul peak fp32 {info['matmul']['fp32_gflops']} / bf16 "
          f"{info['matmul']['bf16_gflops']} GFLOP/s", flush=True)
    base = load_params(ROOT / "params.yaml")
    task = load_task(args.artifacts / "prepare", "target")
    work = args.artifacts / "prune_seeds"
    rows = []
    for seed in args.seeds:
        cfg = OmegaConf.merge(base, {"seed": seed, "trainer": {"progress_bar": False}})
        distill = work / f"seed{seed}" / "distill"
        inputs = {"prepare": args.artifacts / "prepare", "transfer": args.artifacts / "transfer", "distill": distill}
        start = time.perf_counter()
        if not (distill / "model.pt").exists():
            run_stage("distill", cfg, distill, inputs)
        distilled = top1(distill, "distill", task, cfg)
        print(f"seed {seed}: distilled {100 * distilled:.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)
        for recipe in args.recipe:
            rcfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(recipe.split()))
            out = work / f"seed{seed}" / ("prune-" + ("_".join(recipe.split()) or "default"))
            start = time.perf_counter()
            if not (out / "model.pt").exists():
                run_stage("prune", rcfg, out, inputs)
            m = json.loads((out / "metrics.json").read_text())
            pruned = top1(out, "prune", task, rcfg)
            rows.append({"recipe": recipe or "(default)", "seed": seed, "distilled": distilled, "pruned": pruned,
                         "difference": pruned - distilled, "macs_reduction": m.get("macs_reduction"),
                         "seconds": time.perf_counter() - start})
            print(table(rows[-1:], COLUMNS), flush=True)
    summary = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        d = mean_difference([r["difference"] for r in mine]) if len(mine) > 1 else {"difference": mine[0]["difference"],
                                                                                    "ci95": [float("nan")] * 2}
        summary.append({"recipe": recipe, "seeds": len(mine), "mean": 100 * d["difference"], "lo": 100 * d["ci95"][0],
                        "hi": 100 * d["ci95"][1], "macs_reduction": min(r["macs_reduction"] or 0 for r in mine)})
    print("\nper seed (top-1 on the target test set, evaluate's TTA):")
    print(table(rows, COLUMNS))
    print("\npruned minus distilled, points (mean over seeds, 95% t interval paired by seed):")
    print(table(summary, [("recipe", "recipe", "s"), ("seeds", "seeds", "d"), ("mean", "mean", "+.2f"),
                          ("lo", "95% lo", "+.2f"), ("hi", "95% hi", "+.2f"), ("macs_reduction", "MACs fewer (x)", ".2f")]))
    print(f"wrote {save('prune_seeds', {**info, 'rows': rows, 'summary': summary})}")
    return 0


COLUMNS = [("recipe", "recipe", "s"), ("seed", "seed", "d"), ("distilled", "distilled", ".4f"), ("pruned", "pruned", ".4f"),
           ("difference", "pruned - distilled", "+.4f"), ("macs_reduction", "MACs fewer (x)", ".2f"), ("seconds", "s", ".0f")]

if __name__ == "__main__":
    sys.exit(main())
