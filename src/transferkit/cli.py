"""The `transferkit` command.

    transferkit <stage> [key=value ...] [-m]   compose conf/ with overrides (a Hydra app);
                                               writes to Hydra's run folder, never to artifacts/
    transferkit <stage> --params params.yaml   what dvc.yaml runs: the composed params as they
                                               are, outputs to artifacts/<stage>/
    transferkit params [key=value ...]         write params.yaml from conf/
    transferkit check-params                   fail if params.yaml differs from conf/
    transferkit collect DIR                    a sweep folder -> one table and plot
    transferkit check-repro                    run the smoke pipeline twice, fail unless identical
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.stages import STAGES

HELP = f"""usage: transferkit COMMAND [options] [key=value ...]

Pipeline stages (dvc repro runs them in order; each can also run alone):
  {', '.join(STAGES)}
      transferkit STAGE --params params.yaml   run on the composed params (what dvc.yaml does);
                                                outputs go to artifacts/STAGE/
      transferkit STAGE [key=value ...] [-m]   compose conf/ with Hydra overrides; outputs go to
                                                Hydra's run folder (outputs/ or multirun/)

Configuration:
  transferkit params [key=value ...]   compose conf/ (+ overrides) into params.yaml
  transferkit check-params             exit 1 if params.yaml differs from conf/

Sweeps and reproducibility:
  transferkit transfer -m transfer.freeze_depth=0,1,2,3,4 seed=0,1,2
                                       a Hydra multirun into multirun/<experiment>/<overrides>/;
                                       rerun it after a crash and finished points are skipped
  transferkit collect multirun/cifar10_split [--out DIR]
                                       every point -> table (mean ± std over seeds, test minus
                                       scratch with a 95% interval) and plot
  transferkit check-repro [--target STAGE]
                                       the smoke pipeline twice from a clean state: fails unless
                                       metrics.json match, dvc status is clean, a 2nd repro is a no-op

Experiments: experiment=cifar10_split (default) | seed_aquatic | smoke
             | scenario_{{small,large}}_{{similar,different}} (the four scenarios; `transferkit scenarios`)
Models: model=fastnet | vgg_mini | resnet18 | mobilenet | fastnet_student
        (students: model@distill.student=mobilenet)
Trainers: trainer=cpu | trainer=gpu | trainer=ddp (DDP over trainer.devices processes/GPUs) | trainer=ddp_multinode
Loggers: trainer.loggers=[dvclive] (default) | [dvclive,tensorboard,csv]
Launchers (with -m): hydra/launcher=local_parallel (joblib) | slurm (submitit)

Deploying:
  transferkit export artifacts/prune/model.pt --out DIR   ONNX + TorchScript, checked against PyTorch
  transferkit predict MODEL IMAGE [IMAGE ...]             classify image files (model.pt or .onnx)

Common overrides:
  transfer.freeze_depth=K  transfer.backbone_lr_mult=X  transfer.unfreeze_every_epochs=N
  probe.depth=K  pretrain.epochs=N  transfer.epochs=N  seed=N  trainer.devices=N
  data.target.train_per_class=N  data.target.classes=[cat,dog]  paths.artifacts_dir=DIR
"""


# Commands beside the stages: each module has main(argv) -> exit code, and its own --help.
TOOLS = {
    "collect": "transferkit.sweep.collect",
    "check-repro": "transferkit.reproducibility.check",
    "scenarios": "transferkit.scenarios.runner",
    "export": "transferkit.deploy.export",
    "predict": "transferkit.deploy.predict",
}


def run_stage(stage: str, cfg, out: Path) -> dict:
    import importlib

    import yaml

    from transferkit.config.compose import to_params
    from transferkit.config.validate import validate
    from transferkit.stages.common import seed_everything, staged_output, storage_errors

    validate(cfg)
    seed_everything(cfg.seed)
    module = importlib.import_module(f"transferkit.stages.{stage}")
    # the params saved with the outputs say what produced them: sweeps resume and collect by
    # them, and a killed run's folder is resumed only by a run with the same params
    params = yaml.safe_dump(to_params(cfg), sort_keys=False)
    with storage_errors(out), staged_output(out, params) as work:
        return module.run(cfg, work)


def _params_mode(stage: str, params: Path, out: Path | None = None) -> None:
    from transferkit.config.compose import load_params
    from transferkit.stages.common import stage_dir

    cfg = load_params(params)
    run_stage(stage, cfg, out or stage_dir(cfg, stage))


def _multi_process(cfg) -> bool:
    return str(cfg.trainer.strategy) not in ("auto", "single_device", "None")


def _run_job_in_subprocess(stage: str, cfg, job_dir: Path, out: Path) -> None:
    """Run one Hydra job's stage as `transferkit STAGE --params FILE --out DIR` in a fresh
    process. Under DDP, Lightning starts the other ranks by re-running the command line; under
    Hydra it re-runs the whole (multi)run, which makes duplicate output folders and, in a
    sweep, launches every point again. A child that knows nothing of Hydra avoids both."""
    import subprocess

    import yaml

    from transferkit.config.compose import to_params
    from transferkit.io import save_text

    params = job_dir / f"{stage}.params.yaml"
    save_text(yaml.safe_dump(to_params(cfg), sort_keys=False), params)
    code = subprocess.run([sys.executable, "-m", "transferkit.cli", stage, "--params", str(params),
                           "--out", str(out)]).returncode
    if code:
        sys.exit(code)  # the child has already printed its one error line


def _hydra_mode(stage: str, argv: list[str]) -> None:
    """A real Hydra app, so -m sweeps, launchers and --cfg work as Hydra users expect."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from transferkit.config.compose import find_conf_dir
    from transferkit.sweep.points import already_done, check_points

    # Compose and validate every point of a sweep before the first one trains, so a typo'd
    # key or an out-of-range value ends in one error line at once, not after hours.
    check_points(stage, [a for a in argv if "=" in a and not a.startswith("-")])

    @hydra.main(config_path=str(find_conf_dir()), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        out = job_dir / stage
        try:
            if already_done(out, cfg):  # a rerun of an interrupted sweep skips the finished points
                print(f"transferkit {stage}: {out} already finished with this config; skipped")
            elif _multi_process(cfg):
                _run_job_in_subprocess(stage, cfg, job_dir, out)
            else:
                run_stage(stage, cfg, out)
        except TransferkitError as e:  # Hydra would print it with its own wrapper and exit 1
            print(f"transferkit {stage}: error: {e}", file=sys.stderr)
            sys.exit(2)

    sys.argv = [f"transferkit {stage}", *argv]
    app()


def _option(args: list[str], name: str) -> str | None:
    if name in args:
        i = args.index(name)
        return args[i + 1] if i + 1 < len(args) else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "params":
            from transferkit.config.compose import compose, params_text

            from transferkit.io import save_text

            save_text(params_text(compose(rest)), Path("params.yaml"))
            print("wrote params.yaml")
        elif command == "check-params":
            from transferkit.config.compose import params_drift

            drift = params_drift(Path(rest[0] if rest else "params.yaml"))
            if drift:
                print("params.yaml differs from conf/:\n  " + "\n  ".join(drift) +
                      "\nFix: run `transferkit params` (add experiment=NAME if you use one) and commit it.",
                      file=sys.stderr)
                return 1
            print("params.yaml matches conf/")
        elif command in TOOLS:
            import importlib

            return importlib.import_module(TOOLS[command]).main(rest)
        elif command in STAGES:
            if "--params" in rest:
                _params_mode(command, Path(_option(rest, "--params") or "params.yaml"),
                             Path(out) if (out := _option(rest, "--out")) else None)
            else:
                _hydra_mode(command, rest)
        else:
            print(f"transferkit: unknown command '{command}'. Fix: use one of "
                  f"{', '.join([*STAGES, 'params', 'check-params', *TOOLS])} (see `transferkit --help`).", file=sys.stderr)
            return 2
    except TransferkitError as e:
        print(f"transferkit {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
