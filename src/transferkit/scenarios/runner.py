"""`transferkit scenarios`: the four scenarios of the source material, measured.

    transferkit scenarios [--out DIR] [--only NAME ...] [--early-depth K] [--partial-depth K]
                          [key=value ...]

Target data small or large x source similar or different, one experiment preset each
(conf/experiment/scenario_*.yaml). For every quadrant: prepare, pretrain, then five
strategies with the same epochs (a fair budget), each in its own folder:

    DIR/<preset>/prepare  pretrain  linear_probe  early_probe  partial_freeze  fine_tune  scratch

Stages run in-process exactly as the CLI runs them (validated, seeded, written atomically).
A rerun skips every stage already finished with the same config and refuses a folder made
with another one. The two quadrants with the same source share one pretraining: the second
copies the first's backbone when its prepared source images are identical and every setting
pretraining reads is the same (the target task is the only difference).

Every model is then scored on its quadrant's target test set and DIR/scenarios.md and
scenarios.json hold the table: val and test top-1 with 95% intervals, the winner chosen on
validation accuracy, the best on test, and the source material's guidance next to it.
key=value overrides apply to every quadrant (e.g. seed=1, model=vgg_mini, pretrain.epochs=4).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from transferkit.config.compose import compose, to_params
from transferkit.errors import TransferkitError
from transferkit.io import save_json, save_text
from transferkit.sweep.points import COSMETIC, PARAMS_FILE, already_done

# preset -> (target size, source similarity), in the order of the report
QUADRANTS = {
    "scenario_small_similar": ("small", "similar"),
    "scenario_small_different": ("small", "different"),
    "scenario_large_similar": ("large", "similar"),
    "scenario_large_different": ("large", "different"),
}

# The source material's four scenarios (../shared/docs/design.md) and the strategy each names.
GUIDANCE = {
    ("small", "similar"): ("linear_probe", "linear classifier on the features"),
    ("small", "different"): ("early_probe", "classifier on earlier-layer features"),
    ("large", "similar"): ("fine_tune", "fine-tune all"),
    ("large", "different"): ("fine_tune", "fine-tune all from the pretrained init"),
}

# Keys that never change what pretrain computes: a finished pretraining of another quadrant
# with the same values elsewhere (and the same source images) is the same model.
NOT_READ_BY_PRETRAIN = ("name", "data.target", "paths.artifacts_dir", "transfer", "probe", "scratch",
                        "distill", "prune", *COSMETIC)
SHARED_NOTE = "shared_from.json"


@dataclass(frozen=True)
class Strategy:
    name: str        # output folder
    label: str
    stage: str       # the pipeline stage that trains it
    overrides: dict  # on top of the quadrant's config

    def describe(self, cfg: DictConfig, num_blocks: int) -> str:
        mult = cfg.transfer.backbone_lr_mult
        depth = self.overrides.get("probe.depth", self.overrides.get("transfer.freeze_depth"))
        return {
            "linear_probe": f"new head on the features of all {num_blocks} pretrained blocks (frozen)",
            "early_probe": f"new head on the features of pretrained blocks[:{depth}] (frozen)",
            "partial_freeze": f"pretrained blocks[:{depth}] frozen, the rest fine-tuned (backbone LR x{mult})",
            "fine_tune": f"every pretrained block fine-tuned (backbone LR x{mult})",
            "scratch": "every block from random init",
        }[self.name]


def strategies(early_depth: int = 2, partial_depth: int = 2) -> list[Strategy]:
    return [
        Strategy("linear_probe", "linear probe", "probe", {"probe.depth": None}),
        Strategy("early_probe", f"probe on block {early_depth}", "probe", {"probe.depth": early_depth}),
        Strategy("partial_freeze", f"partial freeze ({partial_depth})", "transfer",
                 {"transfer.freeze_depth": partial_depth}),
        Strategy("fine_tune", "full fine-tune", "transfer", {"transfer.freeze_depth": 0}),
        Strategy("scratch", "scratch", "scratch", {}),
    ]


@dataclass
class Quadrant:
    preset: str
    size: str
    similarity: str
    cfg: DictConfig
    root: Path
    num_blocks: int
    configs: dict[str, DictConfig] = field(default_factory=dict)  # strategy name -> config

    @property
    def title(self) -> str:
        return f"{self.size} target + {self.similarity} source"


# ------------------------------------------------------------------ configs, checked up front
def resolve_presets(only: list[str] | None) -> list[str]:
    if not only:
        return list(QUADRANTS)
    chosen = []
    for name in only:
        preset = name if name in QUADRANTS else f"scenario_{name}"
        if preset not in QUADRANTS:
            raise TransferkitError(f"unknown scenario '{name}'. Fix: use one of {', '.join(QUADRANTS)} "
                                   f"(or without the scenario_ prefix).")
        if preset not in chosen:
            chosen.append(preset)
    return [p for p in QUADRANTS if p in chosen]


def _check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in ("experiment", "name", "paths.artifacts_dir") or key.startswith("hydra"):
            raise TransferkitError(f"override '{o}' cannot be used here: the runner sets the experiment preset "
                                   f"and output folder of each quadrant. Fix: use --only NAME and --out DIR.")


def strategy_config(cfg: DictConfig, strategy: Strategy) -> DictConfig:
    out = copy.deepcopy(cfg)
    for key, value in strategy.overrides.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def build_quadrants(presets: list[str], overrides: list[str], out: Path, plan: list[Strategy]) -> list[Quadrant]:
    """Compose and validate every quadrant and strategy before anything trains, so a bad
    override or depth fails in a second, not after the first pretraining."""
    from transferkit.config.validate import validate, validate_probe, validate_transfer
    from transferkit.models import model_from_config

    _check_overrides(overrides)
    quadrants = []
    for preset in presets:
        root = out / preset
        cfg = compose([f"experiment={preset}", "trainer.progress_bar=false", *overrides,
                       f"paths.artifacts_dir={root}"])
        validate(cfg)
        num_blocks = model_from_config(to_params(cfg.model), 2).num_blocks
        q = Quadrant(preset, *QUADRANTS[preset], cfg, root, num_blocks)
        for s in plan:
            scfg = strategy_config(cfg, s)
            try:
                validate(scfg)
                if s.stage == "probe":
                    validate_probe(scfg, num_blocks)
                elif s.stage == "transfer":
                    validate_transfer(scfg, num_blocks)
            except TransferkitError as e:
                raise TransferkitError(f"{preset}, strategy {s.name}: {e}") from e
            q.configs[s.name] = scfg
        quadrants.append(q)
    return quadrants


# ------------------------------------------------------------------ running the stages
def finished(out: Path, cfg: DictConfig) -> bool:
    """already_done, with a fix that fits this command."""
    return already_done(out, cfg, fix="run the scenarios into another folder (--out DIR)")


def _pretrain_view(params: dict) -> dict:
    view = copy.deepcopy(params)
    for key in NOT_READ_BY_PRETRAIN:
        *parents, last = key.split(".")
        node = view
        for p in parents:
            node = node.get(p, {})
        if isinstance(node, dict):
            node.pop(last, None)
    return view


def source_digest(prepare_dir: Path) -> str:
    """A fingerprint of the prepared source task: the images pretraining actually saw."""
    from transferkit.io import load_torch

    task = load_torch(prepare_dir / "source.pt", "prepared source task", "prepare")
    h = hashlib.sha256(json.dumps(list(task["classes"])).encode())
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        h.update(key.encode())
        h.update(task[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def shareable_pretrain(q: Quadrant) -> Path | None:
    """A finished pretraining of another quadrant under the same output folder that this
    quadrant would reproduce: same pretrain-relevant settings and identical source images."""
    if not q.root.parent.is_dir():
        return None
    mine = _pretrain_view(to_params(q.cfg))
    digest = None
    for other in sorted(q.root.parent.iterdir()):
        candidate = other / "pretrain"
        if other == q.root or not (candidate / PARAMS_FILE).exists() or (candidate / SHARED_NOTE).exists():
            continue
        if not (other / "prepare" / PARAMS_FILE).exists():
            continue
        if _pretrain_view(yaml.safe_load((candidate / PARAMS_FILE).read_text())) != mine:
            continue
        digest = digest or source_digest(q.root / "prepare")
        if source_digest(other / "prepare") == digest:
            return candidate
    return None


def copy_pretrain(source: Path, q: Quadrant) -> None:
    from transferkit.stages.common import staged_output

    with staged_output(q.root / "pretrain") as work:
        shutil.copytree(source, work, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(PARAMS_FILE, "checkpoints", ".*"))
        save_json({"copied_from": str(source),
                   "why": "same source images (identical prepared source.pt) and the same settings for "
                          "everything pretrain reads; only the target task differs"}, work / SHARED_NOTE)
        save_text(yaml.safe_dump(to_params(q.cfg), sort_keys=False), work / PARAMS_FILE)


def _run(stage: str, cfg: DictConfig, out: Path, what: str, timing: dict) -> None:
    from transferkit.cli import run_stage

    if finished(out, cfg):
        print(f"[{what}] already finished with this config; skipped", flush=True)
        timing[out.name] = "skipped"
        return
    print(f"[{what}] running {stage} -> {out}", flush=True)
    start = time.perf_counter()
    run_stage(stage, cfg, out)
    seconds = round(time.perf_counter() - start, 1)
    timing[out.name] = seconds
    print(f"[{what}] done in {seconds:.1f} s", flush=True)


def run_quadrant(q: Quadrant, plan: list[Strategy]) -> dict:
    """prepare, pretrain (or a copy of an identical one), then every strategy; returns the
    wall seconds of each step run now ('skipped' for finished ones)."""
    timing: dict = {}
    short = q.preset.removeprefix("scenario_")
    _run("prepare", q.cfg, q.root / "prepare", f"{short} prepare", timing)
    pretrain = q.root / "pretrain"
    if not finished(pretrain, q.cfg) and (source := shareable_pretrain(q)) is not None:
        start = time.perf_counter()
        copy_pretrain(source, q)
        timing["pretrain"] = f"copied from {source}"
        print(f"[{short} pretrain] same source task and settings as {source}: copied "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    else:
        _run("pretrain", q.cfg, pretrain, f"{short} pretrain", timing)
    for s in plan:
        _run(s.stage, q.configs[s.name], q.root / s.name, f"{short} {s.name}", timing)
    return timing


# ------------------------------------------------------------------ scoring and the report
def score_quadrant(q: Quadrant, plan: list[Strategy]) -> dict:
    from transferkit.evaluation.metrics import paired_difference, wilson_interval
    from transferkit.io import load_torch
    from transferkit.sweep.collect import Run, score

    task = load_torch(q.root / "prepare" / "target.pt", "prepared target task", "prepare")
    n_val, n_test = len(task["val_y"]), len(task["test_y"])
    runs = {}
    for s in plan:
        folder = q.root / s.name
        params = yaml.safe_load((folder / PARAMS_FILE).read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        runs[s.name] = Run(s.stage, folder, params, [], metrics.get("val_acc"))
    score(list(runs.values()))

    def interval(acc, n):
        return list(wilson_interval(round(acc * n), n)) if acc is not None and n else None

    rows = []
    for s in plan:
        r = runs[s.name]
        timing_file = r.folder / "timing.json"
        rows.append({
            "strategy": s.name, "label": s.label, "stage": s.stage, "what": s.describe(q.cfg, q.num_blocks),
            "epochs": int(q.configs[s.name][s.stage].epochs), "folder": str(r.folder),
            "val_acc": r.val_acc, "val_ci95": interval(r.val_acc, n_val),
            "test_acc": r.test_acc, "test_ci95": interval(r.test_acc, n_test),
            "train_seconds": json.loads(timing_file.read_text()).get("train_seconds") if timing_file.exists() else None,
        })
    with_val = [r for r in rows if r["val_acc"] is not None]
    # ties on val go to the earlier (cheaper, more frozen) strategy in the list
    winner = max(with_val, key=lambda r: r["val_acc"], default=None)
    best_test = max(rows, key=lambda r: r["test_acc"])
    guided_name, guidance = GUIDANCE[(q.size, q.similarity)]
    guided = next((r for r in rows if r["strategy"] == guided_name), None)
    for r in rows:
        r["chosen_on_val"] = r is winner
        r["best_on_test"] = r is best_test
    versus = None
    if winner is not None and guided is not None and guided is not winner:
        d = paired_difference(runs[guided_name].correct, runs[winner["strategy"]].correct)
        versus = {"difference": d["difference"], "ci95": d["ci95"], "n": d["n"],
                  "method": "test images, paired by image (one seed: test-set noise only)"}
    pretrain = q.root / "pretrain"
    pre_metrics = json.loads((pretrain / "metrics.json").read_text())
    d = q.cfg.data
    return {
        "preset": q.preset, "size": q.size, "similarity": q.similarity, "title": q.title,
        "model": str(q.cfg.model.name), "num_blocks": q.num_blocks,
        "source_classes": list(d.source.classes), "target_classes": list(task["classes"]),
        "n_source_train": _n_train(q.root / "prepare"), "pretrain_epochs": int(q.cfg.pretrain.epochs),
        "pretrain_source_test_acc": pre_metrics.get("test_acc"),
        "pretrain_shared_from": (json.loads((pretrain / SHARED_NOTE).read_text())["copied_from"]
                                 if (pretrain / SHARED_NOTE).exists() else None),
        "n_train": len(task["train_y"]), "n_val": n_val, "n_test": n_test,
        "rows": rows,
        "winner_on_val": winner["strategy"] if winner else None,
        "best_on_test": best_test["strategy"],
        "guidance": {"strategy": guided_name, "text": guidance},
        "agrees": (winner["strategy"] == guided_name) if winner else None,
        "guided_ties_winner_on_val": bool(winner and guided and guided is not winner
                                          and guided["val_acc"] == winner["val_acc"]),
        "guided_minus_winner_test": versus,
    }


def _n_train(prepare_dir: Path) -> int | None:
    summary = prepare_dir / "summary.json"
    return json.loads(summary.read_text())["source"]["n_train"] if summary.exists() else None


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _with_interval(acc, ci) -> str:
    return "–" if acc is None else f"{_pct(acc)} ({_pct(ci[0])}–{_pct(ci[1])})"


def _label(result: dict, name: str | None) -> str:
    return next((r["label"] for r in result["rows"] if r["strategy"] == name), "–")


def _verdict(result: dict) -> str:
    if result["agrees"] is None:
        return "– (no validation split)"
    if result["agrees"]:
        return "yes"
    v = result["guided_minus_winner_test"]
    lo, hi = v["ci95"]
    noise = "within noise" if lo <= 0 <= hi else ("guidance better on test" if lo > 0 else "guidance worse")
    tie = ", tied on val (ties go to the earlier strategy)" if result["guided_ties_winner_on_val"] else ""
    return (f"no{tie}: {_label(result, result['guidance']['strategy'])} is {100 * v['difference']:+.1f} points on "
            f"test vs the winner ({100 * lo:+.1f} to {100 * hi:+.1f}; {noise})")


def report_markdown(results: list[dict]) -> str:
    first = results[0]
    lines = [
        "# The four transfer scenarios, measured",
        "",
        f"Target: {', '.join(first['target_classes'])} in every quadrant (CIFAR-10), so the quadrants compare; "
        f"test = {first['n_test']:,} official test images. Model: {first['model']} ({first['num_blocks']} blocks). "
        f"Every strategy of a quadrant trains for the same number of epochs. The winner is chosen on "
        f"validation accuracy (◀ val); test accuracy is reported, never used to choose. Intervals: 95% "
        f"(Wilson). One seed.",
        "",
        "## Summary",
        "",
        "| quadrant | target train | source (pretrain epochs: source test top-1) | source material says | "
        "winner on val | its test top-1 % | best on test | agrees? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        win = next((x for x in r["rows"] if x["chosen_on_val"]), None)
        best = next(x for x in r["rows"] if x["best_on_test"])
        lines.append(
            f"| {r['title']} | {r['n_train']:,} | {', '.join(r['source_classes'])} ({r['pretrain_epochs']} ep: "
            f"{_pct(r['pretrain_source_test_acc'])}%) | {r['guidance']['text']} ({_label(r, r['guidance']['strategy'])}) | "
            f"{win['label'] if win else '–'} | {_pct(win['test_acc']) if win else '–'} | "
            f"{best['label']} ({_pct(best['test_acc'])}) | {_verdict(r)} |")
    for r in results:
        epochs = sorted({x["epochs"] for x in r["rows"]})
        shared = f"; backbone shared with {Path(r['pretrain_shared_from']).parent.name}" if r["pretrain_shared_from"] else ""
        lines += [
            "",
            f"## {r['title']} (`{r['preset']}`)",
            "",
            f"Target train {r['n_train']:,}, val {r['n_val']:,}, test {r['n_test']:,}. Source "
            f"{', '.join(r['source_classes'])}: {r['n_source_train'] or 0:,} images, pretrained {r['pretrain_epochs']} "
            f"epoch{'s' * (r['pretrain_epochs'] != 1)} (source test top-1 {_pct(r['pretrain_source_test_acc'])}%{shared}). Every strategy: "
            f"{', '.join(map(str, epochs))} epoch{'s' * (epochs != [1])}.",
            "",
            "| strategy | what is trained | val top-1 % (95% interval) | test top-1 % (95% interval) | train s |",
            "|---|---|---|---|---|",
        ]
        for x in r["rows"]:
            mark = " ◀ val" if x["chosen_on_val"] else ""
            name = f"**{x['label']}**{mark}" if x["chosen_on_val"] else x["label"]
            best = " (best on test)" if x["best_on_test"] else ""
            secs = "–" if x["train_seconds"] is None else f"{x['train_seconds']:.0f}"
            lines.append(f"| {name} | {x['what']} | {_with_interval(x['val_acc'], x['val_ci95'])} | "
                         f"{_with_interval(x['test_acc'], x['test_ci95'])}{best} | {secs} |")
        lines += ["", f"Source material: {r['guidance']['text']} ({_label(r, r['guidance']['strategy'])}). "
                      f"Agrees with the val winner: {_verdict(r)}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ command
def run(out: Path, only: list[str] | None = None, overrides: list[str] | None = None,
        early_depth: int = 2, partial_depth: int = 2) -> dict:
    plan = strategies(early_depth, partial_depth)
    quadrants = build_quadrants(resolve_presets(only), list(overrides or []), out, plan)
    timing = {}
    start = time.perf_counter()
    for q in quadrants:
        timing[q.preset] = run_quadrant(q, plan)
    results = [score_quadrant(q, plan) for q in quadrants]
    summary = {"quadrants": results, "overrides": list(overrides or []),
               "strategies": [{"name": s.name, "label": s.label, "stage": s.stage, "overrides": s.overrides}
                              for s in plan]}
    out.mkdir(parents=True, exist_ok=True)
    save_json(summary, out / "scenarios.json")
    save_text(report_markdown(results), out / "scenarios.md")
    save_json({"this_run_seconds": round(time.perf_counter() - start, 1), "steps": timing,
               "train_seconds": {r["preset"]: {x["strategy"]: x["train_seconds"] for x in r["rows"]}
                                 for r in results}},
              out / "scenarios_timing.json")
    return summary


VALUE_OPTIONS = ("--out", "--early-depth", "--partial-depth")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """key=value overrides apart from the options (an --out path may contain '=' too)."""
    overrides, options, value_next = [], [], False
    for a in argv:
        if value_next or a in VALUE_OPTIONS or a.startswith("-") or "=" not in a:
            options.append(a)
            value_next = a in VALUE_OPTIONS
        else:
            overrides.append(a)
    return overrides, options


def main(argv: list[str]) -> int:
    overrides, options = split_argv(argv)
    parser = argparse.ArgumentParser(prog="transferkit scenarios", description=__doc__.split("\n\n")[0],
                                     epilog="key=value overrides (Hydra syntax) apply to every quadrant.")
    parser.add_argument("--out", type=Path, default=Path("scenarios"), help="output folder (default scenarios/)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these of {', '.join(QUADRANTS)}")
    parser.add_argument("--early-depth", type=int, default=2, help="probe.depth of the earlier-block probe (2)")
    parser.add_argument("--partial-depth", type=int, default=2, help="transfer.freeze_depth of partial freeze (2)")
    args = parser.parse_args(options)
    run(args.out, args.only, overrides, args.early_depth, args.partial_depth)
    print()
    print((args.out / "scenarios.md").read_text())
    print(f"wrote {args.out / 'scenarios.md'}, {args.out / 'scenarios.json'}, {args.out / 'scenarios_timing.json'}")
    return 0
