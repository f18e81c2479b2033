"""The `transferkit` command.

    transferkit <stage> [key=value ...] [-m]   compose conf/ with overrides (a Hydra app);
                                               writes to Hydra's run folder, never to artifacts/
    transferkit <stage> --params params.yaml   what dvc.yaml runs: the composed params as they
                                               are, outputs to artifacts/<stage>/
    transferkit params [key=value ...]         write params.yaml from conf/
    transferkit check-params                   fail if params.yaml differs from conf/
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

Experiments: experiment=cifar10_split (default) | experiment=seed_aquatic | experiment=smoke
Models: model=fastnet | model=vgg_mini | model=resnet18
Trainers: trainer=cpu | trainer=gpu | trainer=ddp (DDP over trainer.devices processes/GPUs)
Common overrides:
  transfer.freeze_depth=K  transfer.backbone_lr_mult=X  transfer.unfreeze_every_epochs=N
  probe.depth=K  pretrain.epochs=N  transfer.epochs=N  seed=N  trainer.devices=N
  data.target.train_per_class=N  data.target.classes=[cat,dog]  paths.artifacts_dir=DIR
"""


def run_stage(stage: str, cfg, out: Path) -> dict:
    import importlib

    from transferkit.config.validate import validate
    from transferkit.stages.common import seed_everything, staged_output

    validate(cfg)
    seed_everything(cfg.seed)
    module = importlib.import_module(f"transferkit.stages.{stage}")
    with staged_output(out) as work:
        return module.run(cfg, work)


def _params_mode(stage: str, params: Path) -> None:
    from transferkit.config.compose import load_params
    from transferkit.stages.common import stage_dir

    cfg = load_params(params)
    run_stage(stage, cfg, stage_dir(cfg, stage))


def _hydra_mode(stage: str, argv: list[str]) -> None:
    """A real Hydra app, so -m sweeps, launchers and --cfg work as Hydra users expect."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from transferkit.config.compose import compose, find_conf_dir

    # Compose the plain key=value overrides once up front so a typo'd key ends in our one-line
    # error; sweep values (a=1,2 / range()) and hydra.* settings are left to Hydra itself.
    plain = [a for a in argv if "=" in a and not a.startswith(("-", "hydra.", "hydra/"))
             and "," not in a.split("=", 1)[1] and "(" not in a.split("=", 1)[1]]
    compose(plain)

    @hydra.main(config_path=str(find_conf_dir()), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        run_stage(stage, cfg, Path(HydraConfig.get().runtime.output_dir) / stage)

    sys.argv = [f"transferkit {stage}", *argv]
    app()


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
        elif command in STAGES:
            if "--params" in rest:
                i = rest.index("--params")
                _params_mode(command, Path(rest[i + 1] if i + 1 < len(rest) else "params.yaml"))
            else:
                _hydra_mode(command, rest)
        else:
            print(f"transferkit: unknown command '{command}'. Fix: use one of "
                  f"{', '.join(STAGES)}, params, check-params (see `transferkit --help`).", file=sys.stderr)
            return 2
    except TransferkitError as e:
        print(f"transferkit {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
