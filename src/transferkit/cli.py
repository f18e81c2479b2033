"""The `transferkit` command (`transferkit --help` lists everything it does)."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import sys
from pathlib import Path

from transferkit import warm
from transferkit.errors import TransferkitError, die_of, end_with_parent, error_line, one_line_errors, user_error
from transferkit.stages import BY_NAME, STAGES
from transferkit.training import first_process, other_node  # light: warm imports it too

# export is a stage of dvc.yaml with a command of its own (under Deploying below)
RUNNABLE = tuple(s for s in STAGES if not BY_NAME[s].command)
HELP = f"""usage: transferkit COMMAND [options] [key=value ...]

Stages ({', '.join(RUNNABLE)}):
  transferkit STAGE --params params.yaml [--out DIR] [--in STAGE=DIR ...] [key=value ...]
                        what dvc.yaml runs: outputs to artifacts/STAGE/, inputs from artifacts/
  transferkit STAGE [key=value ...] [-m]
                        compose conf/ (a Hydra app); outputs to outputs/, or multirun/ with -m
Configuration:
  transferkit params [key=value ...]   write params.yaml (conf/ composed) and dvc.yaml (the stage table);
                                       give every override each time: they replace the earlier ones
  transferkit check-params [FILE]      exit 1 if either differs from what it is made from
Runs and results:
  transferkit sweep STAGE key=a,b seed=0,1,2 [--out DIR]   a sweep as DVC stages, then collect
  transferkit collect DIR [--out DIR]  runs in sweep folders -> table (over seeds, minus scratch) and plot
  transferkit scenarios [key=value ...] [--only NAME,...]   the four transfer scenarios and their report
  transferkit results [DIR]            the pipeline's results table (artifacts/evaluate)
  transferkit check-repro [--target STAGE]   two clean `dvc repro` runs must give identical outputs
Deploying:
  transferkit export MODEL.pt --out DIR       ONNX + TorchScript, checked against PyTorch
  transferkit predict MODEL IMAGE [IMAGE ...] classify image files (model.pt or .onnx)

Experiments: experiment=cifar10_split (default) | smoke | scenario_... | cifar10_full, seed_aquatic (CIFAR-100 target)
Models: model=fastnet | fastnet_tiny | fastnet_micro | fastnet_student | fastnet_airbench | vgg_mini | resnet18
        | mobilenet;  model@distill.student=NAME
Trainers: trainer=cpu | trainer=gpu | trainer=ddp | trainer=ddp_multinode;  trainer.precision=auto
Common overrides: transfer.freeze_depth=K  seed=N  pretrain.epochs=N  trainer.loggers=[dvclive,csv]
Shell completion: eval "$(transferkit -sc install=bash)"   (Hydra's flags: transferkit STAGE --hydra-help)
Each command has --help (transferkit --version: the version); docs/ has the details.
"""

# Commands beside the stages: each module has main(argv) -> exit code, and its own --help.
TOOLS = {"check-params": "transferkit.config.drift", "collect": "transferkit.sweep.collect",
         "sweep": "transferkit.sweep.points", "check-repro": "transferkit.reproducibility.check",
         "results": "transferkit.evaluation.tables", "scenarios": "transferkit.scenarios.report",
         "export": "transferkit.deploy.export", "predict": "transferkit.deploy.predict"}


def _params_mode(stage: str, args: list[str]) -> None:
    """`--params FILE [--out DIR] [--in NAME=DIR ...] [key=value ...]`."""
    import argparse

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from transferkit.config.checks import validate
    from transferkit.config.compose import find_conf_dir, load_params, merge_overrides
    from transferkit.config.drift import stale_keys
    from transferkit.stages.run import run_stage
    from transferkit.sweep.points import check_inputs, check_read, override_key

    parser = one_line_errors(argparse.ArgumentParser(prog=f"transferkit {stage}", allow_abbrev=False),
                             f"transferkit {stage} --params FILE [--out DIR] [--in STAGE=DIR ...] [key=value ...]")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, help=f"default: paths.artifacts_dir/{stage}")
    parser.add_argument("--in", dest="inputs", action="append", default=[], metavar="STAGE=DIR")
    opts, overrides = parser.parse_known_args(args)
    # conf/'s config groups name what an override of the file cannot choose (None: a params file run outside a project)
    conf_dir = find_conf_dir(required=False)
    cfg = merge_overrides(load_params(opts.params), overrides, opts.params, conf_dir, stage)
    if conf_dir:  # outside a project there is no conf/ to say which keys a stage reads
        check_read(stage, overrides)
    if stale := stale_keys(opts.params, cfg, conf_dir):  # else read where first used: after training, maybe
        raise TransferkitError(stale)
    inputs, given = dict(item.partition("=")[::2] for item in opts.inputs), [i.partition("=")[0] for i in opts.inputs]
    if bad := [f"{k}={v}" for k, v in inputs.items() if k not in BY_NAME[stage].reads or not v or given.count(k) > 1]:
        name = bad[0].partition("=")[0]  # a stage it does not read: a typo, which would run on the default's
        what = ("given twice" if given.count(name) > 1 else "no folder given" if name in BY_NAME[stage].reads
                else f"{stage} reads no output of {name}" if name in STAGES else "no stage by that name")
        raise TransferkitError(f"--in {bad[0]}: {what}. Fix: --in STAGE=DIR, with STAGE one of the stages "
                               f"{stage} reads: {', '.join(BY_NAME[stage].reads) or 'none'}.")
    if missing := [f"{k}={v}" for k, v in inputs.items() if not Path(v).is_dir()]:
        raise TransferkitError(f"--in {missing[0]}: no such folder. Fix: give the folder the "
                               f"'{missing[0].partition('=')[0]}' stage wrote its outputs to.")
    try:
        validate(cfg)  # first: name and paths.* are read below, and a null or a number there was a TypeError
        if not os.environ.get("DVC_STAGE"):  # by hand: its inputs may be another run's (`dvc repro` made them so)
            check_inputs(stage, cfg, {override_key(o) for o in overrides}, inputs, opts.params)
        run_stage(stage, cfg, opts.out or Path(cfg.paths.artifacts_dir, stage), {k: Path(v) for k, v in inputs.items()})
    except (ConfigAttributeError, ConfigKeyError) as e:  # struct mode: a key the code reads is not in the file
        raise TransferkitError(f"{opts.params} has no {e.full_key}: it was written from another conf/ or edited by "
                               f"hand. Fix: write it again with `transferkit params` (`transferkit check-params` "
                               f"lists what differs).") from e


def _run_job_in_subprocess(stage: str, cfg, job_dir: Path, out: Path) -> None:
    """Run one Hydra job's stage as `transferkit STAGE --params FILE --out DIR` in a fresh process. Under DDP,
    Lightning starts the other ranks by re-running the command line; under Hydra it re-runs the whole (multi)run,
    making duplicate output folders and, in a sweep, launching every point again. A child without Hydra does neither."""
    import subprocess

    from transferkit.config.compose import params_text
    from transferkit.io import save_text

    params = job_dir / f"{stage}.params.yaml"
    save_text(params_text(cfg), params)
    with subprocess.Popen([sys.executable, "-m", "transferkit.cli", stage, "--params", str(params), "--out", str(out)],
                          env={**os.environ, "TRANSFERKIT_HYDRA_JOB": "1"}) as child:  # its rerun: a new job folder
        while (code := _wait_through_ctrl_c(child)) is None:
            pass
    if code in (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGTERM):  # the child said so in its line (143: a
        sys.exit(die_of(-code if code < 0 else signal.SIGTERM))  # fit's SIGTERM): this process dies of it too
    if code < 0:  # a signal the child could not report (the out-of-memory killer, kill -9): 137 for SIGKILL
        print(f"transferkit {stage}: error: its process was killed by signal {-code} ({signal.strsignal(-code)}; "
              f"out of memory, or kill -9). Fix: run it again into {job_dir} (hydra.run.dir; with -m, hydra.sweep.dir):"
              f" it resumes there.", file=sys.stderr)
        sys.exit(128 - code)
    if code:
        sys.exit(code)  # the child has already printed its one error line


def _wait_through_ctrl_c(child, grace_s: float = 5.0) -> int | None:
    """The child's exit status; None after a Ctrl+C. From a terminal it reached the child too, which stops its
    ranks and says so in its own line (subprocess.run killed it 0.25 s on); sent to this process alone (kill
    -INT, an IDE's stop button), it is passed on once the child has not stopped within `grace_s`."""
    import subprocess

    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            return child.wait(grace_s)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)
        except KeyboardInterrupt:  # a second Ctrl+C: the child has it too
            pass
        return None


def _hydra_mode(stage: str, argv: list[str]) -> None:
    """A real Hydra app, so -m sweeps, launchers and --cfg work as Hydra users expect."""
    import hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig

    from transferkit.config.compose import compose, find_conf_dir
    from transferkit.config.hydra_callbacks import Refused, declared_sweep, without_rerun
    from transferkit.sweep.points import check_points, expand
    from transferkit.training import multi_process

    # Hydra's own parser reads the flags (abbreviated ones too), and the overrides from anywhere among
    # them: Hydra's parse_args refuses `a=1 -m b=2`
    parser = one_line_errors(get_args_parser(), f"Hydra's flags are listed by `transferkit {stage} --hydra-help`; "
                                                "settings are key=value; a params file is --params FILE")
    args = without_rerun(parser.parse_intermixed_args(argv))  # --experimental-rerun unpickles a file: refused
    for flag, does in (("resolve", "resolves"), ("package", "picks the package of")):  # alone, Hydra ignores them
        if getattr(args, flag) and not (args.cfg or args.help):  # and -p FILE reads like --params FILE
            raise TransferkitError(f"--{flag} {does} the config that --cfg or --help prints. Fix: add --cfg job, or "
                                   f"leave --{flag} out{'; a params file is --params FILE' * (flag == 'package')}.")
    modes = [f"--{m}" for m in ("run", "multirun", "cfg", "info", "shell-completion")
             if getattr(args, m.replace("-", "_"))]
    if len(modes) > 1 and not (args.help or args.hydra_help):
        raise TransferkitError(f"{' and '.join(modes)} ask for two things: Hydra does one of --run, --multirun, "
                               f"--cfg, --info and --shell-completion at a time. Fix: give one of them.")
    overrides = [] if args.hydra_help else args.overrides  # Hydra's own help, which composes none of conf/
    scripts = {f"{a}={shell}" for a in ("install", "uninstall") for shell in ("bash", "zsh", "fish")}  # Hydra's
    if args.shell_completion and overrides not in [[s] for s in (*scripts, "query=bash", "query=fish")]:
        raise TransferkitError(f"--shell-completion takes install=SHELL or uninstall=SHELL (bash, zsh, fish), not "
                               f"'{' '.join(overrides)}'. Fix: eval \"$(transferkit -sc install=bash)\".")
    argv = [*(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
              if k != "overrides" and v != parser.get_default(k)), "--", *overrides]  # each flag as Hydra read it
    # Compose and validate every point of a sweep before the first one trains: a typo'd key or an out-of-range value
    # is one error line at once, not after hours; flags that print and run nothing (help, --cfg) only compose them
    if args.help or args.cfg or args.info:  # a typo'd key in one line, not Hydra's advice to add it with +key
        for point in expand(overrides) if args.info in ("defaults", "defaults-tree", "plugins") else [overrides]:
            compose(point)  # where Hydra composes one config, a sweep's values too
    elif not (args.shell_completion or args.hydra_help):  # install=bash is no override of conf/
        multirun = args.multirun or "hydra.mode=MULTIRUN" in overrides  # Hydra's two ways to ask for one
        if not multirun and (swept := [o for o in overrides if len(expand([o])) > 1]):
            raise TransferkitError(f"{swept[0]} lists several values, which only a sweep runs. Fix: add -m (a "
                                   f"Hydra multirun, into multirun/), or run `transferkit sweep {stage} "
                                   f"{' '.join(overrides)}` (DVC stages: cached and resumable).")
        check_points(stage, [*(declared_sweep(overrides) if multirun else []), *overrides])  # conf/'s sweep too
        if settings := [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]:  # which points
            compose(settings)  # leave out: composed here, so a typo is one line

    conf = None if overrides and overrides[0] in scripts else str(find_conf_dir())  # a script for any folder
    @hydra.main(config_path=conf, config_name="config", version_base="1.3")
    def app(cfg) -> None:
        from transferkit.stages.run import run_stage

        job_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            if multi_process(cfg.trainer):
                _run_job_in_subprocess(stage, cfg, job_dir, job_dir / stage)
            else:
                run_stage(stage, cfg, job_dir / stage)
        except TransferkitError as e:  # Hydra would print it with its own wrapper and exit 1
            print(error_line(stage, e), file=sys.stderr)
            sys.exit(2)

    # the name Hydra's help shows; a completion script registers the command itself (_shell_completion)
    sys.argv = ["transferkit" if args.shell_completion else f"transferkit {stage}", *argv]
    if args.shell_completion:  # `| head`: Hydra would print the closed pipe's BrokenPipeError as a traceback
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        app()
    except Refused as e:
        raise TransferkitError(str(e)) from None


def _shell_completion(argv: list[str]) -> None:
    """`transferkit -sc query=SHELL`, as Hydra's completion script asks: the command, then a stage's overrides."""
    if not any("query=" in a for a in argv):  # install, uninstall: one script for every stage
        return _hydra_mode(RUNNABLE[0], argv)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())  # a line typed half-way: nothing under the prompt
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) + line.endswith(" ") <= 2:
        print("\n".join([*RUNNABLE, "params", *TOOLS]))  # the shell keeps those the word begins
    elif words[1] in RUNNABLE:  # else the shell's own completion: files
        start = line.index(words[1], len(line) - len(line.lstrip()) + len(words[0]))
        os.environ["COMP_LINE"] = line[:start] + line[start + len(words[1]):].lstrip()  # as Hydra's own app has it
        _hydra_mode(words[1], argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv or ["--help"])[0], argv[1:]
    params_mode = any(a == "--params" or a.startswith("--params=") for a in rest)
    if command in STAGES and not BY_NAME[command].trains and not first_process():
        return 0  # under srun or torchrun every rank runs the command: a stage that fits nothing runs once, on rank 0
    if os.environ.get("DVC_STAGE") and first_process():  # a stage dvc runs ends with it: its rerun resumes
        end_with_parent()
    try:  # `transferkit --help | head` too: a closed pipe below
        if command in ("-h", "--help", "help") or (command == "params" and {"-h", "--help"} & set(rest)):
            print(HELP if command != "params" else HELP.split("Configuration:\n")[1].split("Runs and")[0].rstrip())
            return 0
        if command in ("--version", "-V"):  # the installed package's version, as `pip show` gives it
            return print(f"transferkit {importlib.metadata.version('transferkit')}") or 0
        if (command == "export" or (command in RUNNABLE and params_mode)) and warm.enabled():  # what dvc.yaml runs
            if (code := warm.run(argv)) is not None:
                return code
            os.environ.pop("TRANSFERKIT_WARM")  # run here: the DDP ranks this starts start no servers of their own
        if command == "params":
            from transferkit.config.compose import find_conf_dir, override_key, recorded_overrides, write_generated
            from transferkit.project import refuse_while_dvc_runs

            refuse_while_dvc_runs(find_conf_dir().parent)
            before = recorded_overrides(find_conf_dir().parent / "params.yaml") or []
            for path in write_generated(rest):
                print(f"wrote {path}")
            if dropped := [o for o in before if override_key(o) not in map(override_key, rest)]:  # keys not given again
                print(f"composed with {' '.join(rest) or 'no overrides'}; no longer with {' '.join(dropped)} (give "
                      f"every override you want each time)")
        elif command in ("-sc", "--shell-completion") or command.startswith("--shell-completion="):
            _shell_completion(argv)
        elif command in TOOLS:
            return importlib.import_module(TOOLS[command]).main(rest)
        elif command in RUNNABLE:
            (_params_mode if params_mode else _hydra_mode)(command, rest)
        else:
            raise TransferkitError(f"unknown command '{command}'. Fix: use one of "
                                   f"{', '.join([*RUNNABLE, 'params', *TOOLS])} (see `transferkit --help`).")
    except BrokenPipeError:  # `transferkit results | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 1
    except (TransferkitError, OSError) as e:
        if (e := user_error(e)) is None:  # an OSError other than a path this user may not open: a bug's traceback
            raise
        if first_process():  # under DDP every rank meets the error: one line, from rank 0
            print(error_line(command, e), file=sys.stderr)
        elif node := other_node():  # and one from each other node, which may meet it alone
            print(error_line(f"{command} (node {node})", e), file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl+C, or a fit's SIGTERM (training/trainer.py): one line, rank 0's
        if isinstance(e, SystemExit) and e.code != 128 + signal.SIGTERM:
            raise
        sig = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        if first_process():  # a stage's own run resumes where a checkpoint is left (stages/common.py says if one is)
            again = command in ("sweep", "scenarios") or (params_mode and command in STAGES and BY_NAME[command].trains
                                                          and getattr(e, "resumes", False)
                                                          and "TRANSFERKIT_HYDRA_JOB" not in os.environ)
            print(f"transferkit {command}: {'interrupted' if sig == signal.SIGINT else 'stopped by SIGTERM'}; its "
                  f"earlier outputs, if any, are unchanged{'; the same command again resumes' if again else ''}.",
                  file=sys.stderr)
        # then die of SIGINT, as Python does on an uncaught one: a shell's loop around the command stops too; SIGTERM
        return die_of(sig) if sig == signal.SIGINT else e.code  # keeps the exit status its SystemExit carries
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
