"""`transferkit scenarios`: the four scenarios of the source material, measured.

    transferkit scenarios [--out DIR] [--only NAME ...] [--early-depth K] [--partial-depth K]
                          [key=value ...]

Target data small or large x source similar or different, one experiment preset each
(conf/experiment/scenario_*.yaml). DIR/dvc.yaml holds them as DVC stages: each quadrant's
prepare, one pretraining per source (the two quadrants with the same source share it: their
source images and pretraining settings are the same) and five strategies per quadrant with the
same epochs (a fair budget). DVC runs what is missing or changed and skips the rest; a killed
strategy resumes from its checkpoint. Every model is then scored on its quadrant's target test
set, and DIR/scenarios.md and scenarios.json hold the table: val and test top-1 with 95%
intervals, the winner chosen on validation accuracy, the best on test, and the source
material's guidance beside it. key=value overrides apply to every quadrant (seed=1, model=vgg_mini).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from transferkit.config.compose import compose, params_text
from transferkit.errors import TransferkitError
from transferkit.evaluation.scenarios import score_quadrant
from transferkit.evaluation.tables import scenarios_markdown
from transferkit.io import save_json, save_text
from transferkit.project import stage_run
from transferkit.stages import BY_NAME

# preset -> (target size, source similarity), in the order of the report
QUADRANTS = {"scenario_small_similar": ("small", "similar"), "scenario_small_different": ("small", "different"),
             "scenario_large_similar": ("large", "similar"), "scenario_large_different": ("large", "different")}
SHARED_BY_SOURCE = ("seed", "model", "pretrain", "data.source", "data.image_size")  # what pretraining reads


@dataclass(frozen=True)
class Strategy:
    name: str        # output folder
    label: str
    stage: str       # the pipeline stage that trains it
    overrides: dict  # on top of the quadrant's config
    what: str        # what is trained, for the report


def strategies(early: int = 2, partial: int = 2) -> list[Strategy]:
    return [Strategy("linear_probe", "linear probe", "probe", {"probe.depth": None}, "new head on all pretrained blocks (frozen)"),
            Strategy("early_probe", f"probe on block {early}", "probe", {"probe.depth": early},
                     f"new head on pretrained blocks[:{early}] (frozen)"),
            Strategy("partial_freeze", f"partial freeze ({partial})", "transfer", {"transfer.freeze_depth": partial},
                     f"pretrained blocks[:{partial}] frozen, the rest fine-tuned"),
            Strategy("fine_tune", "full fine-tune", "transfer", {"transfer.freeze_depth": 0}, "every pretrained block fine-tuned"),
            Strategy("scratch", "scratch", "scratch", {}, "every block from random init")]


def pipeline(out: Path, overrides: list[str], plan: list[Strategy]) -> dict:
    """Compose and check every quadrant and strategy (a bad override fails in a second, before
    anything trains), write each quadrant's params file and return the DVC stages."""
    from transferkit.config.schema import validate_run

    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") in ("experiment", "name", "paths.artifacts_dir") or o.startswith("hydra"):
            raise TransferkitError(f"override '{o}' cannot be used here: each quadrant sets its experiment and "
                                   f"folders. Fix: use --only NAME and --out DIR.")
    code = str(Path(__file__).resolve().parents[1])
    stages, sources, blocks = {}, {}, {}
    # the keys of a quadrant's params file DVC watches per stage (the data folder is a dep instead)
    keys = {stage: [k for k in BY_NAME[stage].params if k != "paths.data_dir"] for stage in BY_NAME}
    for preset, (size, similarity) in QUADRANTS.items():
        cfg = compose([f"experiment={preset}", "trainer.progress_bar=false", *overrides])
        data_dir = str(Path(cfg.paths.data_dir).resolve())
        cfg.paths.data_dir = data_dir
        for s in [None, *plan]:
            try:
                point = compose([f"experiment={preset}", *overrides, *(f"{k}={'null' if v is None else v}"
                                                                     for k, v in (s.overrides if s else {}).items())])
                validate_run(point, s.stage if s else None, blocks)
            except TransferkitError as e:
                raise TransferkitError(f"{preset}{f', strategy {s.name}' if s else ''}: {e}") from e
        first = sources.setdefault(similarity, (preset, cfg))
        if any(OmegaConf.select(first[1], k) != OmegaConf.select(cfg, k) for k in SHARED_BY_SOURCE):
            raise TransferkitError(f"{preset} and {first[0]} have the same source but other pretraining settings: "
                                   f"they cannot share one pretraining. Fix: override only what both may share.")
        params = f"params/{preset}.yaml"
        save_text(params_text(cfg), out / params)
        prepared = {"prepare": f"{preset}/prepare"}
        stages[f"{preset}-prepare"] = stage_run("prepare", params, f"{preset}/prepare", {}, [data_dir, code], keys["prepare"])
        if first[0] == preset:
            stages[f"{similarity}-pretrain"] = stage_run("pretrain", params, f"pretrain-{similarity}", prepared, [code],
                                                         keys["pretrain"])
        for s in plan:
            stages[f"{preset}-{s.name}"] = stage_run(
                s.stage, params, f"{preset}/{s.name}", {**prepared, "pretrain": f"pretrain-{similarity}"}, [code],
                keys[s.stage], [f"{k}={'null' if v is None else v}" for k, v in s.overrides.items()])
    return stages


def run(out: Path, only: list[str] | None = None, overrides: list[str] | None = None,
        early_depth: int = 2, partial_depth: int = 2) -> dict:
    from transferkit.project import run_pipeline

    chosen = [p for p in QUADRANTS if not only or p in {o if o in QUADRANTS else f"scenario_{o}" for o in only}]
    unknown = [o for o in only or [] if o not in QUADRANTS and f"scenario_{o}" not in QUADRANTS]
    if unknown:
        raise TransferkitError(f"unknown scenario '{unknown[0]}'. Fix: use one of {', '.join(QUADRANTS)} "
                               f"(or without the scenario_ prefix).")
    plan = strategies(early_depth, partial_depth)
    stages = pipeline(out, list(overrides or []), plan)
    start = time.perf_counter()
    ran = run_pipeline(out, stages, [name for name in stages if name.split("-")[0] in chosen])
    results = [score_quadrant(out, preset, *QUADRANTS[preset], plan) for preset in chosen]
    summary = {"quadrants": results, "overrides": list(overrides or []),
               "strategies": [{"name": s.name, "label": s.label, "stage": s.stage, "overrides": s.overrides} for s in plan]}
    save_json(summary, out / "scenarios.json")
    save_text(scenarios_markdown(results), out / "scenarios.md")
    save_json({"this_run_seconds": round(time.perf_counter() - start, 1), "stages_run": ran}, out / "scenarios_timing.json")
    return summary


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the key=value overrides among the other arguments (--only takes several
    names, and would take the overrides after it too)."""
    parser = argparse.ArgumentParser(prog="transferkit scenarios", description=__doc__.split("\n\n")[0],
                                     epilog="key=value overrides (Hydra syntax) apply to every quadrant.")
    parser.add_argument("--out", type=Path, default=Path("scenarios"), help="output folder (default scenarios/)")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help=f"run only these of {', '.join(QUADRANTS)}")
    parser.add_argument("--early-depth", type=int, default=2, help="probe.depth of the earlier-block probe (2)")
    parser.add_argument("--partial-depth", type=int, default=2, help="transfer.freeze_depth of partial freeze (2)")
    args, rest = parser.parse_known_args(argv)
    if bad := [a for a in rest if "=" not in a]:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    names = [a for a in args.only if "=" not in a]
    if args.only and not names:
        parser.error("argument --only: expected at least one scenario name")
    extra = {*rest, *(a for a in args.only if "=" in a)}
    args.only = names
    return args, [a for a in argv if a in extra]  # in argv's order: of two values for a key, the last wins


def main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    run(args.out, args.only, overrides, args.early_depth, args.partial_depth)
    print((args.out / "scenarios.md").read_text())
    print(f"wrote {args.out / 'scenarios.md'}, {args.out / 'scenarios.json'}, {args.out / 'scenarios_timing.json'}")
    return 0
