"""The four scenarios' report: each quadrant's strategies scored on its target test set and set
beside the source material's advice (`transferkit scenarios` runs them, scenarios/report.py)."""

from __future__ import annotations

import json
from pathlib import Path

from transferkit.evaluation.metrics import paired_difference, wilson_interval
from transferkit.evaluation.runs import read_run, score
from transferkit.stages.common import load_task

# The source material's four scenarios and the strategy each names.
GUIDANCE = {("small", "similar"): ("linear_probe", "linear classifier on the features"),
            ("small", "different"): ("early_probe", "classifier on earlier-layer features"),
            ("large", "similar"): ("fine_tune", "fine-tune all"),
            ("large", "different"): ("fine_tune", "fine-tune all from the pretrained init")}


def score_quadrant(out: Path, preset: str, size: str, similarity: str, plan: list) -> dict:
    """One quadrant's strategies (out/preset/NAME, scenarios.report.Strategy) scored on its target
    test set, the winner chosen on validation accuracy, and the source material's advice beside it."""
    task = load_task(out / preset / "prepare", "target")
    runs = {s.name: read_run(out / preset / s.name, s.stage) for s in plan}
    score(list(runs.values()), task, cache_file=out / preset / "scores.pt")  # a rerun scores only what changed
    n_val, n_test = len(task["val_y"]), len(task["test_y"])

    def interval(acc, n):
        return list(wilson_interval(round(acc * n), n)) if acc is not None and n else None

    rows = [{"strategy": s.name, "label": s.label, "stage": s.stage, "what": s.what, "folder": str(runs[s.name].folder),
             "epochs": int(runs[s.name].params[s.stage]["epochs"]), "val_acc": runs[s.name].val_acc,
             "val_ci95": interval(runs[s.name].val_acc, n_val), "test_acc": runs[s.name].test_acc,
             "test_ci95": interval(runs[s.name].test_acc, n_test), "train_seconds": runs[s.name].train_seconds}
            for s in plan]
    with_val = [r for r in rows if r["val_acc"] is not None]
    winner = max(with_val, key=lambda r: r["val_acc"], default=None)  # ties: the earlier (cheaper) strategy
    best = max(rows, key=lambda r: r["test_acc"])  # the first of a tie; every tied row is marked best on test
    guided_name, guidance = GUIDANCE[(size, similarity)]
    for r in rows:
        r["chosen_on_val"], r["best_on_test"] = r is winner, r["test_acc"] == best["test_acc"]
        r["tied_on_val"] = bool(winner) and r is not winner and r["val_acc"] == winner["val_acc"]
    versus = None
    if winner and winner["strategy"] != guided_name:
        d = paired_difference(runs[guided_name].correct, runs[winner["strategy"]].correct)
        versus = {**d, "method": "test images, paired by image (one seed: test-set noise only)"}
    pretrain = json.loads((out / f"pretrain-{similarity}" / "metrics.json").read_text())
    source = json.loads((out / preset / "prepare" / "summary.json").read_text())["source"]
    return {"preset": preset, "size": size, "similarity": similarity, "title": f"{size} target + {similarity} source",
            "source_classes": source["classes"], "n_source_train": source["n_train"],
            "target_classes": list(task["classes"]),
            "pretrain_epochs": int(runs[plan[0].name].params["pretrain"]["epochs"]),
            "pretrain_folder": f"pretrain-{similarity}",
            "pretrain_source_test_acc": pretrain.get("test_acc"), "n_train": len(task["train_y"]), "n_val": n_val,
            "n_test": n_test, "rows": rows, "winner_on_val": winner["strategy"] if winner else None,
            "best_on_test": best["strategy"], "tied_on_test": [r["strategy"] for r in rows if r["best_on_test"]][1:],
            "guidance": {"strategy": guided_name, "text": guidance},
            "agrees": (winner["strategy"] == guided_name) if winner else None,
            "guided_ties_winner_on_val": bool(winner and versus and runs[guided_name].val_acc == winner["val_acc"]),
            "guided_minus_winner_test": versus}
