"""Many runs of the pipeline's stages (a sweep's points, the scenarios' strategies), each
scored again on the target test set it was trained for, and summarized over seeds."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from transferkit.errors import NotPlainData, TransferkitError
from transferkit.evaluation.metrics import mean_difference, paired_difference, predict
from transferkit.plain import differing, flatten, plain_json, plain_yaml
from transferkit.stages import TARGET_MODELS
from transferkit.stages.common import PARAMS_FILE

REFERENCES = ("scratch", "probe")  # the baselines a sweep's runs are compared with
log = logging.getLogger(__name__)


@dataclass
class Run:
    stage: str
    folder: Path
    params: dict
    val_acc: float | None
    train_seconds: float | None = None
    setting: tuple[str, ...] = ()
    test_acc: float = math.nan
    correct: torch.Tensor | None = field(default=None, repr=False)
    test_set: str | None = None  # the digest of the test images it was scored on (score): pairs share one
    prepared: Path | None = None  # the prepare folder it read, where not paths.artifacts_dir's (a scenarios quadrant)

    @property
    def seed(self) -> int:
        return int(self.params.get("seed", 0))

    @property
    def prepare_dir(self) -> Path:
        """The prepared task it is scored on: the one it read, else the one its params name."""
        return self.prepared or Path(self.params["paths"]["artifacts_dir"]) / "prepare"

    @property
    def label(self) -> str:
        return " ".join([self.stage, *self.setting])


def read_run(folder: Path, stage: str, prepared: Path | None = None) -> Run:
    if not (folder / PARAMS_FILE).exists():
        raise TransferkitError(f"{folder} has a model but no {PARAMS_FILE} saying how it was made. Fix: rerun it, "
                               f"or move it out of the sweep folder.")
    try:
        params = plain_yaml((folder / PARAMS_FILE).read_text())
        metrics, timing = (plain_json((folder / name).read_text()) if (folder / name).exists() else {}
                           for name in ("metrics.json", "timing.json"))
        if not all(isinstance(d, dict) for d in (params, metrics, timing)):
            raise ValueError("not a mapping")
        if fault := _shape_fault(params := integral(params), metrics, timing):
            raise ValueError(fault)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise TransferkitError(f"{folder} holds a damaged {PARAMS_FILE}, metrics.json or timing.json "
                               f"({' '.join(str(e).split())[:200]}). Fix: rerun it, or move it out of the sweep "
                               f"folder.") from e
    return Run(stage, folder, params, metrics.get("val_acc"), timing.get("train_seconds"), prepared=prepared)


def _shape_fault(params: dict, metrics: dict, timing: dict) -> str | None:
    """What a run's files lack of what a stage writes and scoring reads, or None."""
    if "paths" in params and not (isinstance(paths := params["paths"], dict)  # scoring reads it (score)
                                  and isinstance(paths.get("artifacts_dir"), str)):
        return "its paths.artifacts_dir is no folder name"
    if type(params.get("seed", 0)) is not int:
        return f"seed {params['seed']!r} is no whole number"
    if block := next((k for k in ("data", "trainer", "evaluate") if not isinstance(params.get(k, {}), dict)), None):
        return f"its {block} block is no mapping"
    if key := next((k for k, v in (("val_acc", metrics.get("val_acc")), ("train_seconds", timing.get("train_seconds")))
                    if v is not None and type(v) not in (int, float)), None):
        return f"its {key} is no number"
    return None


def assignment(key: str, value) -> str:
    """`key=value` as a row's setting names it, and as YAML and Hydra write it (null, not Python's None)."""
    return f"{key}={'null' if value is None else value}"


def integral(value):
    """A whole float as the int it is, in lists and dicts too: runs made with lr=1 and with lr=1.0 (Hydra composes
    the two alike) are one setting, not two rows, and scratch's match."""
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def check_task(run: Run, task_file: Path, prepared: dict[Path, dict]) -> None:
    """The prepared task at `task_file` is the one `run` was trained for: the data block of the params
    prepare saved beside it is the run's (seeds may differ: a seed sweep reads one prepare).
    `prepared` caches each task file's data block."""
    where, fix = (("the prepare folder its runs folder's dvc.yaml gives it", "Fix: run the command that made the runs "
                   "again (DVC remakes what changed)") if run.prepared else
                  (f"a relative paths.artifacts_dir resolves from the current folder, {Path.cwd()}",
                   "Fix: run collect from the project folder that made the runs"))
    if task_file not in prepared:
        if not task_file.is_file():
            raise TransferkitError(f"{run.folder} is scored on the target test set at {task_file}, which does not "
                                   f"exist ({where}). {fix}, after its 'prepare' stage ran (`dvc repro prepare`).")
        try:
            saved = plain_yaml((task_file.parent / PARAMS_FILE).read_text())
        except (OSError, yaml.YAMLError):
            saved = None
        if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict):
            raise TransferkitError(f"{task_file.parent} has no readable {PARAMS_FILE} saying which data it was "
                                   f"prepared with. Fix: prepare it again (`dvc repro prepare`).")
        prepared[task_file] = flatten({"data": saved["data"]})
    mine = flatten({"data": run.params.get("data")})
    if keys := differing(mine, prepared[task_file]):
        here, there = (json.dumps(d.get(keys[0], "<missing>")) for d in (mine, prepared[task_file]))
        raise TransferkitError(f"{run.folder} was trained with {keys[0]}={here}, but the target test set at "
                               f"{task_file} was prepared with {keys[0]}={there} ({where}). {fix}.")


def load_cache(cache_file: Path | None) -> dict:
    """The per-image results of an earlier collect. A damaged one is a cache: rebuilt, with a warning. One
    that would run code is refused, as every file transferkit reads back is (docs/faults.md)."""
    from transferkit.io import load_plain

    if not cache_file or not cache_file.exists():
        return {}
    try:
        cache = load_plain(cache_file, f"delete {cache_file} (a cache, made again as runs are scored).")
        if isinstance(cache, dict) and all(isinstance(v, torch.Tensor) for v in cache.values()):
            return cache
        problem = f"{cache_file} is unreadable (not per-image results)"
    except NotPlainData:
        raise
    except TransferkitError as e:  # truncated, damaged, or no pickle at all
        problem = str(e).split(" Fix:", 1)[0].rstrip(".")
    log.warning("%s: scoring every run again to rebuild it", problem)
    return {}


def scoring_code() -> str:
    """A digest of the source files that score a run (predict, the models, checkpoint loading): an edit
    to one scores every run again, as it reruns evaluate."""
    from transferkit.config.dvcyaml import SRC, imported_files

    files = imported_files("transferkit.evaluation.metrics") | imported_files("transferkit.models.__init__")
    return hashlib.sha256(b"".join((SRC / "transferkit" / f).read_bytes() for f in sorted(files))).hexdigest()[:16]


def test_set_digest(task: dict) -> torch.Tensor:
    """The test images' and labels' digest: runs are compared image by image only on the same images."""
    digest = hashlib.sha256(task["test_x"].contiguous().numpy().tobytes())
    digest.update(task["test_y"].contiguous().numpy().tobytes())
    return torch.tensor(list(digest.digest()), dtype=torch.uint8)  # the cache holds tensors only


def score(runs: list[Run], task: dict | None = None, cache_file: Path | None = None) -> None:
    """Top-1 of every run on its target test set (the prepared task it read, else the one its params name, or
    `task`), with the per-image results cached by model and test-set file stamps and the scoring code: a
    retrained model, a re-prepared task or edited scoring code is scored again."""
    from transferkit.io import load_torch, save_torch
    from transferkit.models import load_checkpoint
    from transferkit.training.precision import eval_device

    cache, tasks, prepared, code = load_cache(cache_file), {}, {}, scoring_code()
    given = None if task is None else bytes(test_set_digest(task).tolist()).hex()
    for run in runs:
        if "paths" not in run.params and not run.prepared:  # every stage writes it: scoring reads its test set
            raise TransferkitError(f"{run.folder}'s {PARAMS_FILE} names no paths.artifacts_dir, where the test set it "
                                   f"is scored on lies. Fix: rerun it, or move it out of the sweep folder.")
        task_file = run.prepare_dir / "target.pt"
        if task is None:
            check_task(run, task_file, prepared)
        stamp = task_file.stat().st_mtime_ns if task is None else given  # the test set given: by its digest
        device = eval_device(str(run.params.get("trainer", {}).get("accelerator", "cpu")))  # as evaluate scores it
        if device == "cuda" and not torch.cuda.is_available():  # a GPU's sweep collected on a machine without one
            log.warning("%s trained on a GPU and this machine has none: scored on the CPU, where an image whose "
                        "logits nearly tie may count otherwise.", run.folder)
            device = "cpu"
        key = (f"{run.folder.resolve()}|{(run.folder / 'model.pt').stat().st_mtime_ns}|{stamp}|"
               f"{run.params.get('evaluate')}|{device}|{code}")
        test_set = f"{task_file.resolve()}|{stamp}|test set"
        if task is None and not {key, test_set} <= cache.keys() and task_file not in tasks:
            tasks[task_file] = load_torch(task_file, "prepared target task", "prepare")
        t = task if task is not None else tasks.get(task_file)
        if task is None and test_set not in cache:
            cache[test_set] = test_set_digest(t)
        if key not in cache:
            model, _ = load_checkpoint(run.folder / "model.pt", run.stage, t["classes"])
            ev = run.params.get("evaluate", {})
            logits = predict(model, t["test_x"], int(ev.get("batch_size", 1000)), ev.get("tta", "flip"), device=device)
            cache[key] = logits.argmax(1) == t["test_y"]
        run.correct = cache[key]
        run.test_set = given or bytes(cache[test_set].tolist()).hex()
        run.test_acc = float(run.correct.float().mean())
    if cache_file:
        save_torch(cache, cache_file)


def versus(group: list[Run], baseline: list[Run]) -> dict | None:
    """Test accuracy of `group` minus `baseline` with a 95% interval, over the seeds both ran. With two or
    more, both noises: the spread across seeds (training noise; a t interval) and the test set's (every
    seed scores the same images; paired by image, on the per-image differences averaged over seeds), their
    half-widths added in quadrature. With one, paired by image (test-set noise only); with none, no
    interval. Unpaired seeds are left out: averaging them in would hide the spread across seeds."""
    if not baseline:
        return None
    by_seed = {r.seed: r for r in baseline}
    pairs = [(r, by_seed[r.seed]) for r in group if r.seed in by_seed]
    if len({r.test_set for pair in pairs for r in pair}) > 1:
        b = pairs[0][0]
        a = next(r for pair in pairs for r in pair if r.test_set != b.test_set)
        raise TransferkitError(f"{b.folder} and {a.folder} were scored on different test images (their prepare "
                               f"folders, {b.prepare_dir} and {a.prepare_dir}, hold other test sets under the same "
                               f"settings), so an image-by-image comparison would pair different images. Fix: "
                               f"collect runs of one project's prepared data, or prepare both from the same dataset "
                               f"files.")
    # the table says which, where they are not every seed of the row or of the baseline it is compared with
    paired = {"seeds": sorted(r.seed for r, _ in pairs), "baseline_seeds": sorted(by_seed)}
    if len(pairs) >= 2:
        seeds = mean_difference([a.test_acc - b.test_acc for a, b in pairs])
        images = paired_difference(torch.stack([a.correct for a, _ in pairs]).float().mean(0),
                                   torch.stack([b.correct for _, b in pairs]).float().mean(0))
        mean = seeds["difference"]
        half = math.hypot(seeds["ci95"][1] - mean, images["ci95"][1] - images["difference"])
        return {**seeds, **paired, "ci95": [mean - half, mean + half],
                "method": f"paired by seed over {len(pairs)} seeds (t interval) and by image, combined"}
    if not pairs:
        return {"difference": None, "ci95": None, "pairs": 0, **paired,
                "method": "none where no seed pairs with the baseline's"}
    (a, b), = pairs
    d = paired_difference(a.correct, b.correct)
    return {"difference": d["difference"], "ci95": d["ci95"], "pairs": 1, **paired,
            "method": "paired by image on the one seed both ran (test-set noise only)"}


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and standard deviation; the spread of one value is unknown (None), not zero, and so is the
    mean of none (runs without a val split): None, which JSON has, where NaN is not JSON."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _order(setting: tuple[str, ...]):
    """Numeric values sort as numbers (freeze_depth=10 after 9)."""
    def one(o: str):
        value = o.split("=", 1)[-1]
        try:
            return (0, float(value), "")
        except ValueError:
            return (1, 0.0, value)
    return tuple(one(o) for o in setting)


def summarize(runs: list[Run]) -> dict:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.stage, r.setting)].append(r)
    scratch = [r for r in runs if r.stage == "scratch"]
    rows = []
    for (stage, setting), group in sorted(groups.items(),
                                          key=lambda kv: (TARGET_MODELS.index(kv[0][0]), _order(kv[0][1]))):
        (val_mean, val_std), (test_mean, test_std) = (_mean_std([getattr(r, a) for r in group])
                                                      for a in ("val_acc", "test_acc"))
        rows.append({"stage": stage, "setting": list(setting), "label": group[0].label,
                     "seeds": sorted(r.seed for r in group), "val_mean": val_mean, "val_std": val_std,
                     "test_mean": test_mean, "test_std": test_std,
                     "runs": [{"folder": str(r.folder), "seed": r.seed, "val_acc": r.val_acc, "test_acc": r.test_acc}
                              for r in sorted(group, key=lambda r: r.seed)],
                     # against the scratch runs made with the same swept settings that scratch reads (all of
                     # them, when the sweep is over a key of its own stage only); a row's run holds scratch's
                     # values too (scratch.epochs follows transfer.epochs, and a transfer.epochs sweep
                     # records only the latter in the row's setting)
                     **({"vs_scratch": versus(group, [r for r in scratch if set(r.setting) <= set(setting) | {
                         assignment(*kv) for kv in flatten(group[0].params).items()}])} if stage != "scratch" else {})})
    stages = [r["stage"] for r in rows]
    # a probe collected with scratch alone is what is compared with scratch: the main stage, not its baseline
    swept = [s for s in stages if s not in REFERENCES] or [s for s in stages if s != "scratch"] or stages
    # the stage with the most settings is the one swept (a teacher collected with a distill sweep is one row);
    # ties: the first in row order (TARGET_MODELS': transfer before the stages after it), the same in every process
    main = max(swept, key=swept.count)
    best = max((r for r in rows if r["stage"] == main and r["val_mean"] is not None), key=lambda r: r["val_mean"],
               default=None)
    for r in rows:
        r["chosen_on_val"] = r is best
    return {"stage": main, "rows": rows, "swept": sorted({o.split("=")[0] for r in runs for o in r.setting})}
