"""One GPU: the default pipeline with the GPU trainer, and full CIFAR-10 pretraining.

    python bench/gpu.py [--out DIR]              (on the GPU machine, whose Python has torch)
    uv run python bench/gpu.py --dry-run         (here: the same code on the CPU, tiny settings)

1. The bf16 matrix-multiply peak of this device (8192^3 products), the yardstick for MFU (of bf16 stages).
2. Every stage of dvc.yaml, in its order and with its command, in a fresh folder (conf/ composed
   with trainer=gpu, its loggers the default (CSV where dvclive is not installed, as on the device image);
   the repository's data/): wall seconds measured outside the
   process, training seconds from the stage's timing.json, the rest (start-up, loading,
   evaluation, saving), training images/s, model-FLOPs utilisation and the stage's accuracy; a
   stage that fails is marked so, and the stages after it run where their inputs exist.
   Then the same in another fresh folder with TRANSFERKIT_WARM=1 (part "warm"): each stage a worker
   forked from a server that imported torch and Lightning once.
3. experiment=cifar10_full: pretraining on all 50,000 CIFAR-10 training images, scored on the
   10,000 test images without and with test-time augmentation (without CIFAR-100 in data/, the
   target task is made synthetic: only pretraining is measured).
4. Where a stage's time outside training goes: process start-up (Python, torch, a training stage's
   imports, CUDA's initialisation) with everything installed on the path and with the project's
   dependencies alone (a device image holds many more packages, which some of ours import where
   present), and the slowest imports of each.
5. torch.compile of the training step: compile seconds and steady step time against eager, in-process.
6. Host synchronisations per training step, counted by CUDA's sync debug mode over two fits of
   different lengths.
7. Where a warm stage's seconds go: `transfer`, `export` and `evaluate` under cProfile, each in a
   process that imported what the warm server imports first (the top entries and this project's
   functions by cumulative time, written to DIR/profile-STAGE.txt).
8. The cost of trainer.deterministic=true, against the default, taking turns twice.
9. With --airbench PATH (legacy/airbench94.py of github.com/KellerJordan/cifar10-airbench, not
   part of this project): the published trainer on the same prepared images as part 3
   (bench/airbench_reference.py).

The parts run in this order, so a run stopped by a time limit loses the last ones; --skip leaves
parts out. Each part's results are written as soon as it ends.

Without a CUDA device it says so and exits 0; --dry-run runs the same code on the CPU with the
smoke experiment and a tiny CIFAR-10 subset (to check the script before spending GPU time).
Prints one table per part and writes DIR/gpu.json (default bench/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import statistics
import warnings
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, describe, fresh_inductor_cache, machine, main_of, now, provenance, table, timed, warm_commands  # noqa: E402

TRAINED = {"pretrain", "transfer", "probe", "scratch", "freeze_curve", "distill", "student", "prune"}


def peak_tflops(device: str) -> float:
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compose_params(folder: Path, overrides: list[str]) -> Path:
    from transferkit.config.compose import compose, params_text

    path = folder / "params.yaml"
    path.write_text(params_text(compose(overrides, ROOT / "conf")))
    return path


def workdir(root: Path, name: str, data: Path) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "data").symlink_to(data.resolve())
    return folder


def run_command(cmd: str, cwd: Path) -> float:
    """Seconds `cmd` took; `transferkit` as `python -m transferkit.cli` (a device image has no script)."""
    argv = cmd.split()
    if argv[0] == "transferkit":
        argv = [sys.executable, "-m", "transferkit.cli", *argv[1:]]
    return timed(argv, cwd)[0]


def timings(folder: Path) -> list[dict]:
    files = [folder / "timing.json"] if (folder / "timing.json").exists() else sorted(folder.glob("*/timing.json"))
    return [json.loads(f.read_text()) for f in files]


def train_flops_per_image(artifacts: Path, stage: str) -> float | None:
    """Forward FLOPs x 3 (forward and backward) of the trained model, + the teacher's forward for
    distillation; a linear probe trains its head alone (forward only). Frozen blocks (transfer's
    freeze_depth) are counted as trained: an upper bound."""
    from transferkit.evaluation.cost import count_macs
    from transferkit.models import load_checkpoint

    path = artifacts / stage / "model.pt"
    if stage == "freeze_curve":
        path = next((artifacts / stage).glob("*/model.pt"), path)
    if not path.exists():
        return None
    fwd = 2 * count_macs(load_checkpoint(path, stage)[0])
    if stage == "probe":
        return fwd
    teacher = 0
    if stage in ("distill", "prune"):
        teacher = 2 * count_macs(load_checkpoint(artifacts / "transfer" / "model.pt", "transfer")[0])
    return 3 * fwd + teacher


def accuracy(artifacts: Path, stage: str) -> str:
    folder = artifacts / stage
    if stage == "evaluate":
        m = json.loads((folder / "metrics.json").read_text())["models"]
        return ", ".join(f"{k} {100 * v['top1']:.1f}" for k, v in m.items())
    if stage == "export":
        e = json.loads((folder / "export.json").read_text())
        return f"ONNX by {e['exporter']['onnx']}, agreement {100 * e['onnx']['top1_agreement']:.1f}%"
    if stage == "prepare":
        return ""
    files = [folder / "metrics.json"] if (folder / "metrics.json").exists() else sorted(folder.glob("*/metrics.json"))
    parts = []
    for f in files:
        m = json.loads(f.read_text())
        label = f"{f.parent.name} " if f.parent != folder else ""
        parts += [f"{label}{k} {100 * v:.1f}" for k, v in m.items() if k.endswith("_acc") and isinstance(v, float)]
    return ", ".join(parts)


def pipeline(root: Path, data: Path, trainer: list[str], experiment: list[str], peak: float,
             only: list[str] | None = None, warm: bool = False) -> list[dict]:
    """Each stage as its own fresh process, or with `warm` as a worker of the TRANSFERKIT_WARM server."""
    folder = workdir(root, "pipeline-warm" if warm else "pipeline", data)
    with warm_commands(root / "w", idle=120) if warm else contextlib.nullcontext():
        return _stages(folder, trainer, experiment, peak, only)


def _stages(folder: Path, trainer: list[str], experiment: list[str], peak: float, only: list[str] | None) -> list[dict]:
    compose_params(folder, [*experiment, *trainer])
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    rows = []
    for name, stage in stages.items():
        if only and name not in only:
            continue
        try:
            wall = run_command(stage["cmd"], folder)
        except Exception as e:  # reported in the table; the stages after it still run where their inputs exist
            print(f"{name} failed: {e}"[-3000:], flush=True)
            rows.append({"stage": name, "accuracy": f"failed: {type(e).__name__}"})
            continue
        t = timings(folder / "artifacts" / name) if name in TRAINED else []
        train = sum(x["train_seconds"] for x in t) if name in TRAINED and t else None
        imgs = sum(x["train_images_per_second"] * x["train_seconds"] for x in t) / train if train else None
        flops = train_flops_per_image(folder / "artifacts", name) if train else None
        rows.append({"stage": name, "wall": wall, "train": train, "rest": wall - (train or 0), "img_s": imgs,
                     "mfu": mfu(flops, imgs, t[0].get("precision") if t else None, peak),
                     "precision": t[0].get("precision") if t else None,
                     "accuracy": accuracy(folder / "artifacts", name)})
        print(table(rows[-1:], PIPELINE), flush=True)
    failed = [r["stage"] for r in rows if "wall" not in r]
    done = f"these {len(rows)} stages" if only else "all"  # a part run (--stages) is no whole pipeline
    total = f"**{done}**" if not failed else f"**{done} but {', '.join(failed)}** (failed)"
    rows.append({"stage": total, "wall": sum(r.get("wall") or 0 for r in rows),
                 "train": sum(r.get("train") or 0 for r in rows), "rest": sum(r.get("rest") or 0 for r in rows)})
    return rows


def mfu(flops: float | None, img_s: float | None, precision: str | None, peak: float) -> float | None:
    """Model-FLOPs utilisation, % of the bf16 peak measured in this run: for a bf16 stage only (an fp32 or
    fp16 one against the bf16 peak would measure nothing), else None (a blank cell)."""
    if not (flops and img_s and str(precision).startswith("bf16")):
        return None
    return flops * img_s / (peak * 1e12) * 100


def full_cifar10(root: Path, data: Path, trainer: list[str], extra: list[str], peak: float,
                 epochs: list[int]) -> list[dict]:
    """Prepare once, then pretrain for each of `epochs` (the experiment's own count first)."""
    folder = workdir(root, "cifar10_full", data)
    overrides = ["experiment=cifar10_full", *trainer, *extra]
    if not (data / "cifar-100-python").is_dir():  # pretraining alone is measured: any target will do
        overrides += ["data.target.dataset=synthetic", "data.target.classes=[a,b]", "data.synthetic.train_per_class=8",
                      "data.synthetic.test_per_class=2", "data.target.train_per_class=4", "data.target.val_per_class=2"]
    compose_params(folder, overrides)
    prepare = run_command("transferkit prepare --params params.yaml", folder)
    summary = json.loads((folder / "artifacts" / "prepare" / "summary.json").read_text())["source"]
    # every pretrain is a process of its own, which pays its one-off costs (CUDA start-up, cuDNN autotuning) again:
    # the difference row between two epoch counts leaves them out
    rows = []
    for n in epochs or [None]:
        compose_params(folder, overrides + ([f"pretrain.epochs={n}"] if n else []))
        wall = run_command("transferkit pretrain --params params.yaml", folder)
        t = timings(folder / "artifacts" / "pretrain")[0]
        m = json.loads((folder / "artifacts" / "pretrain" / "metrics.json").read_text())
        flops = train_flops_per_image(folder / "artifacts", "pretrain")
        used = yaml.safe_load((folder / "params.yaml").read_text())["pretrain"]["epochs"]
        rows.append({"epochs": used, "prepare_wall": prepare, "pretrain_wall": wall, "train": t["train_seconds"],
                     "img_s": t["train_images_per_second"],
                     "mfu": mfu(flops, t["train_images_per_second"], t["precision"], peak),
                     "n_train": summary["n_train"], "n_test": summary["n_test"], "test_acc": m.get("test_acc"),
                     "test_acc_tta": m.get("test_acc_tta"), "precision": t["precision"]})
        print(table(rows[-1:], FULL), flush=True)
    if len(rows) >= 2 and rows[-1]["train"] > rows[0]["train"]:
        # the rate of the extra epochs alone: what a fit costs at its start (evaluation at the end,
        # data setup) cancels out of the difference; images as the stages counted them (img/s x s)
        a, b = rows[0], rows[-1]
        rate = (b["img_s"] * b["train"] - a["img_s"] * a["train"]) / (b["train"] - a["train"])
        rows.append({"epochs": f"{a['epochs']}->{b['epochs']}", "n_train": a["n_train"],
                     "train": b["train"] - a["train"],
                     "img_s": rate, "mfu": rows[0]["mfu"] and rows[0]["mfu"] * rate / a["img_s"]})
        print(table(rows[-1:], FULL), flush=True)
    return rows


def deterministic_cost(root: Path, data: Path, trainer: list[str], experiment: list[str], pairs: int = 2) -> dict:
    """pretrain on the pipeline's prepared data with trainer.deterministic false (the GPU preset) and true (with
    trainer.benchmark false, as bit-identical reruns need), taking
    turns `pairs` times (in one process after another, so neither setting runs first each time)."""
    folder = workdir(root, "deterministic", data)
    shutil.copytree(root / "pipeline" / "artifacts" / "prepare", folder / "artifacts" / "prepare")
    seconds: dict[str, list[float]] = {"false": [], "true": []}
    for i in range(pairs):
        for setting in (("false", "true") if i % 2 == 0 else ("true", "false")):
            # bit-identical reruns need cuDNN autotuning off too: it picks kernels by timing them
            compose_params(folder, [*experiment, *trainer, f"trainer.deterministic={setting}",
                                    f"trainer.benchmark={'false' if setting == 'true' else 'true'}"])
            run_command("transferkit pretrain --params params.yaml", folder)
            seconds[setting].append(timings(folder / "artifacts" / "pretrain")[0]["train_seconds"])
    default, deterministic = (statistics.median(seconds[k]) for k in ("false", "true"))
    return {"train_seconds": seconds, "deterministic_train": deterministic, "default_train": default,
            "cost": deterministic / default - 1}


def _fit_counting_syncs(task: dict, steps: int, device: str, tmp: Path) -> int:
    import pytorch_lightning as pl

    from transferkit.data.loader import TaskDataModule
    from transferkit.models import build_model
    from transferkit.training.classifier import ClassifierModule
    from transferkit.training.trainer import fit

    n = steps * 256
    sub = {**task, "train_x": task["train_x"][:n], "train_y": task["train_y"][:n], "val_y": task["val_y"][:0],
           "val_x": task["val_x"][:0]}
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(build_model("fastnet", len(task["classes"]), widths=[64, 256, 256]), lr=0.5,
                              weight_decay=5e-4, momentum=0.9, label_smoothing=0.2, warmup_fraction=0.1)
    trainer = {"accelerator": "gpu" if device == "cuda" else "cpu", "devices": 1, "precision": "auto",
               "deterministic": False, "benchmark": True, "loggers": ["csv"], "progress_bar": False,
               "checkpoint_budget": 0.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(module, TaskDataModule(sub, 256, 1024, val_split="none"), trainer, tmp / f"sync{steps}", 1)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def host_syncs(root: Path, device: str) -> dict:
    from transferkit.io import load_torch

    task = load_torch(root / "pipeline" / "artifacts" / "prepare" / "source.pt", "task", "prepare")
    _fit_counting_syncs(task, 4, device, root)  # the process's first fit pays one-off syncs: not the step's
    few, many = (_fit_counting_syncs(task, s, device, root) for s in (8, 24))
    if device != "cuda":  # CUDA's sync debug mode is what counts them: the dry run checks the code only
        return {"steps": [8, 24], "syncs": None, "per_step": None, "note": "not measured: no CUDA device"}
    return {"steps": [8, 24], "syncs": [few, many], "per_step": (many - few) / 16}


def compile_cost(device: str, batch: int) -> dict:
    """One training step of the default fastnet at `batch` (bf16 autocast), eager vs torch.compile."""
    import torch.nn.functional as F

    fresh_inductor_cache()  # a rerun on the same machine would read the compiled kernels back and time nothing

    from transferkit.models import build_model

    def make():
        torch.manual_seed(0)
        widths = [64, 256, 256] if device == "cuda" else [8, 16, 16]  # the CPU dry run checks the code path only
        model = build_model("fastnet", 10, widths=widths).to(device).to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def steps(model, opt, n):
        for _ in range(n):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)

    out = {}
    for name in ("eager", "compiled"):
        model, opt = make()
        if name == "compiled":
            model = torch.compile(model)
        t = time.perf_counter()
        steps(model, opt, 3)
        first = time.perf_counter() - t
        t = time.perf_counter()
        steps(model, opt, 50)
        out[name] = {"first_3_steps_s": first, "step_ms": (time.perf_counter() - t) / 50 * 1000}
    saved = out["eager"]["step_ms"] - out["compiled"]["step_ms"]
    extra = out["compiled"]["first_3_steps_s"] - out["eager"]["first_3_steps_s"]
    out["steps_to_win_back"] = extra * 1000 / saved if saved > 0 else None
    return out


def src_env() -> dict[str, str]:
    """The environment with this checkout's src/ first on the path: the device machine runs a copy
    of the tree that is not installed, and `python -m transferkit.cli` must find it."""
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def project_site(folder: Path) -> Path:
    """A folder of links to the installed distributions this project needs (pyproject's dependencies
    and theirs, as installed here, markers evaluated) and nothing else. A device image holds many more
    (transformers, scikit-learn, ...), and some of our dependencies import optional packages wherever
    they are installed (torchmetrics imports transformers): `python -S` with this folder on the path
    starts a stage as the project's own environment would on that machine."""
    import importlib.metadata as md
    import re
    import tomllib

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    dists: dict = {}
    for d in md.distributions():  # in sys.path order: the first of a name is the one imported
        dists.setdefault(norm(d.metadata["Name"]), d)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r).name for r in project["dependencies"]]
    needed: set[str] = set()
    while todo:
        name = norm(todo.pop())
        if name in needed or name not in dists:
            continue
        needed.add(name)
        for r in dists[name].requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    folder.mkdir(parents=True)
    for name in sorted(needed):
        for top in sorted({Path(f).parts[0] for f in dists[name].files or []}):
            target = Path(dists[name].locate_file(top))
            if top in ("..", "__pycache__") or top.endswith(".pth") or not target.exists():
                continue
            if not (folder / top).exists():
                (folder / top).symlink_to(target)
    return folder


def import_times(argv: list[str], env: dict, top: int = 20) -> list[list]:
    """The `top` imports by cumulative seconds under `python -X importtime` (nesting shown by indent),
    each as [module, cumulative s, own s]."""
    proc = subprocess.run([*argv, "-X", "importtime", "-c", "import transferkit.stages.pretrain"], env=env,
                          stderr=subprocess.PIPE, text=True, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append([parts[2].rstrip(), int(parts[1]) / 1e6, int(parts[0]) / 1e6])
    return sorted(rows, key=lambda r: -r[1])[:top]


def startup(root: Path, device: str, repeats: int) -> dict:
    """Seconds a fresh process takes for: nothing, `import torch`, a training stage's imports, and
    those plus CUDA's initialisation (median of `repeats`), with everything installed here on the
    path and with the project's dependencies alone (`project_site`); and the slowest imports of each."""
    code = {"python": "pass", "torch": "import torch", "stage imports": "import transferkit.stages.pretrain",
            "stage imports + device init": "import transferkit.stages.pretrain, torch; "
                                           f"torch.zeros(1, device='{device}').sum().item()"}
    site = project_site(root / "project-site")
    envs = {"installed": ([sys.executable], src_env()),
            "project dependencies only": ([sys.executable, "-S"],
                                          {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{site}"})}
    out: dict = {}
    for label, (argv, env) in envs.items():
        times = {}
        for name, c in code.items():
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                subprocess.run([*argv, "-c", c], env=env, check=True)
                runs.append(time.perf_counter() - start)
            times[name] = sorted(runs)[len(runs) // 2]
        out[label] = {**times, "slowest imports": import_times(argv, env)}
        print(label, json.dumps(times), flush=True)
    return out


PROFILED = """import cProfile, pstats, sys
from transferkit import warm
warm.server.preload()  # what a TRANSFERKIT_WARM worker starts with: the profile shows the stage's own seconds
from transferkit.cli import main
profile = cProfile.Profile()
code = profile.runcall(main, sys.argv[2:])
import io
from transferkit.io import save_text
out = io.StringIO()
stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
stats.print_stats(70)
stats.print_stats("transferkit", 50)
save_text(out.getvalue(), sys.argv[1])
sys.exit(code)
"""


def profile_stages(root: Path, out: Path, folder: str) -> dict:
    """transfer, export and evaluate once more under cProfile, in the folder of part 2 or "warm" (their
    outputs are replaced by equivalent ones), each in a process that imported what the warm server
    imports first: DIR/profile-STAGE.txt holds the top of the cumulative-time table and this
    project's functions."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    walls = {}
    for name in ("transfer", "export", "evaluate"):
        argv = stages[name]["cmd"].split()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROFILED, str(out / f"profile-{name}.txt"), *argv[1:]],
                              cwd=root / folder, env=src_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        walls[name] = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{name} under cProfile failed: {proc.stdout[-2000:]}")
    return walls


def airbench(root: Path, path: Path) -> dict:
    import airbench_reference

    task = root / "cifar10_full" / "artifacts" / "prepare" / "source.pt"
    return {"exit": airbench_reference.main([str(path), "--task", str(task), "--runs", "3"])}


def attempt(name: str, fn, results: dict, save=None):
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # one part failing must not lose the others' numbers
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    print(f"({name}: {time.perf_counter() - start:.1f} s)", flush=True)
    if save:
        save()
    return results[name]


PARTS = ("pipeline", "warm", "full", "startup", "compile", "syncs", "profile", "deterministic", "airbench")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny settings")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS, metavar="PART",
                    help=f"parts to skip: {' '.join(PARTS)}")
    ap.add_argument("--full-epochs", type=int, nargs="*", default=[],
                    help="part 3 once per value of pretrain.epochs (default: the experiment's own)")
    ap.add_argument("--stages", nargs="*", default=[], help="part 2 for these dvc.yaml stages only (default: all)")
    ap.add_argument("--startup-repeats", type=int, default=3)
    ap.add_argument("--pycache", type=Path, help="PYTHONPYCACHEPREFIX for every process started: on an image "
                    "whose packages ship without bytecode, each module is then compiled once, not per process")
    ap.add_argument("--airbench", type=Path, help="legacy/airbench94.py, to run it on the same images (part 9)")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # part 7's profiles are written by processes in another folder
    from importlib.util import find_spec

    from transferkit.stages import STAGES

    if unknown := [s for s in args.stages if s not in STAGES]:
        ap.error(f"--stages {unknown[0]}: no stage by that name (dvc.yaml's: {', '.join(STAGES)})")
    if not torch.cuda.is_available() and not args.dry_run:
        print("bench/gpu.py: no CUDA device here; nothing measured (--dry-run runs the code on the CPU).")
        return 0
    # what the stages import: a device image lacking one would fail every stage after minutes of GPU time
    if missing := [m for m in ("hydra", "omegaconf", "pydantic", "torch_pruning", "onnx", "onnxruntime", "yaml")
                   if find_spec(m) is None]:
        ap.error(f"{', '.join(missing)} not installed: the stages import them. Fix: install the project's "
                 f"dependencies (on a machine without network, the wheels ../shared/tools/gpu-prepare.sh copies)")
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.pycache:
        os.environ["PYTHONPYCACHEPREFIX"] = str(args.pycache.resolve())
    info = {"when": now(), **provenance(), "machine": machine(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    peak = peak_tflops(device)
    info["bf16_peak_tflops"] = peak
    print(f"{info['device']}; torch {torch.__version__}; bf16 matmul peak {peak:.1f} TFLOP/s; host: "
          f"{describe(info['machine'])}", flush=True)
    # the dry run composes the GPU preset too (autotuning, no deterministic kernels), on the CPU
    trainer = ["trainer=gpu", "trainer.progress_bar=false",
               *([] if device == "cuda" else ["trainer.accelerator=cpu"]),
               # the stages log as users' do (dvclive) where it is installed; device images lack it
               *([] if find_spec("dvclive") else ["trainer.loggers=[csv]"])]
    info["trainer"] = trainer
    experiment = ["experiment=smoke"] if args.dry_run else []
    full_extra = ["data.source.train_per_class=40", "data.source.test_per_class=10", "pretrain.epochs=1",
                  "pretrain.batch_size=64"] if args.dry_run else []
    results: dict = {}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu-dry-run.json" if args.dry_run else "gpu.json")

    def save() -> None:  # after every part: a run cut short keeps what it measured, never a half-written file
        from transferkit.io import save_text

        save_text(json.dumps({**info, **results}, indent=2, default=str) + "\n", path)

    with tempfile.TemporaryDirectory(prefix="transferkit-gpu-") as tmp:
        root = Path(tmp)
        def ok(part: str) -> bool:  # parts 6 and 8 train in part 2's prepared folder
            if part in args.skip:
                return False
            if "error" in results.get("pipeline", {"error": 1}):
                results[part] = {"skipped": "it needs part 2 (pipeline), which was skipped or failed"}
                print(f"\n== {part}: skipped: {results[part]['skipped']}", flush=True)
                save()
                return False
            return True

        if "pipeline" not in args.skip:
            attempt("pipeline", lambda: pipeline(root, args.data, trainer, experiment, peak, args.stages),
                    results, save)
        if "warm" not in args.skip:
            attempt("warm", lambda: pipeline(root, args.data, trainer, experiment, peak, args.stages, warm=True),
                    results, save)
        if "full" not in args.skip:
            full = attempt("full", lambda: full_cifar10(root, args.data, trainer, full_extra, peak, args.full_epochs),
                           results, save)
            if "error" not in full:
                print(table(full, FULL))
        # most wanted first: a run cut short by its time limit loses the last parts only
        if "startup" not in args.skip:
            attempt("startup", lambda: startup(root, device, args.startup_repeats), results, save)
        if "compile" not in args.skip:
            attempt("compile", lambda: compile_cost(device, 1024 if device == "cuda" else 32), results, save)
        if ok("syncs"):
            attempt("syncs", lambda: host_syncs(root, device), results, save)
        ran = [part for part in ("pipeline", "warm") if isinstance(results.get(part), list)]
        if ran and "profile" not in args.skip:
            folder = "pipeline" if ran[0] == "pipeline" else "pipeline-warm"
            attempt("profile", lambda: profile_stages(root, args.out, folder), results, save)
        if ok("deterministic"):
            attempt("deterministic", lambda: deterministic_cost(root, args.data, trainer, experiment), results, save)
        if args.airbench and "airbench" not in args.skip and "error" not in results.get("full", {"error": 1}):
            attempt("airbench", lambda: airbench(root, args.airbench), results, save)
    for name, how in (("pipeline", "fresh processes"), ("warm", "TRANSFERKIT_WARM=1")):
        if isinstance(results.get(name), list):
            print(f"\nThe default pipeline, stage by stage (dvc.yaml's commands, GPU trainer, {how}):")
            print(table(results[name], PIPELINE))
    for name in ("airbench", "syncs", "deterministic", "startup", "profile", "compile"):
        if name in results:
            print(f"\n{name}: {json.dumps(results[name], default=str)}")
    info["machine_after"] = machine()  # the host's speed drifts: its peaks after the timings too
    print(f"\nafter: {describe(info['machine_after'])}")
    save()
    print(f"wrote {path}")
    return 0


PIPELINE = [("stage", "stage", "s"), ("wall", "wall s", ".1f"), ("train", "training s", ".1f"),
            ("rest", "outside training s", ".1f"), ("img_s", "train img/s", ",.0f"), ("mfu", "MFU %", ".1f"),
            ("precision", "precision", "s"), ("accuracy", "accuracy %", "s")]
FULL = [("epochs", "epochs", ""), ("n_train", "train images", ",d"), ("train", "training s", ".1f"),
        ("img_s", "img/s", ",.0f"), ("mfu", "MFU %", ".1f"), ("test_acc", "test top-1", ".4f"),
        ("test_acc_tta", "with TTA", ".4f"),
        ("prepare_wall", "prepare wall s", ".1f"), ("pretrain_wall", "pretrain wall s", ".1f")]

if __name__ == "__main__":
    sys.exit(main_of(main))
