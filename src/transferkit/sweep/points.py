"""`transferkit sweep STAGE key=a,b ... [--out DIR]`: every point of a sweep as a DVC stage in DIR/dvc.yaml, reading
the project's artifacts/ and composed as params.yaml is, plus the sweep; DVC runs the points not yet done (a rerun
after a crash trains only what is missing) and `collect` makes the table (docs/sweeps.md). Every point is composed
and validated before any runs (Hydra finds a bad value only as it reaches that job, after earlier points trained)."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferkit.config.compose import (QUOTING, compose, find_conf_dir, group_choice, params_text,
                                        project_overrides, read_yaml, to_params)
from transferkit.config.drift import params_drift, regenerate_fix
from transferkit.config.overrides import override_key, same_value, swept_fix, value_key
from transferkit.config.dvcyaml import code_files, stale_code, tracked_params
from transferkit.errors import TransferkitError, one_line_errors
from transferkit.evaluation import SCORED_WITH
from transferkit.plain import differing, flatten, under
from transferkit.stages import BY_NAME, TARGET_MODELS

# May differ between a run and the outputs it reads: a seed sweep keeps the data split and the
# backbone, and trainer and paths say how and where a stage ran, not what it computed.
RUN_SETTINGS = ("seed", "trainer", "paths")
# never what sets runs apart: where a run went, what it showed and how it shared the machine
NOT_SWEPT = ("seed", "trainer.progress_bar", "trainer.loggers", "trainer.num_threads", "trainer.checkpoint_budget",
             "paths")


def expand(argv: list[str]) -> list[list[str]]:
    """Every combination of the sweep values in `argv` (Hydra's own parser: a=1,2, range(),
    choice(), glob()), as plain override lists; hydra.* settings are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, Override, Sweep
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except HydraException as e:
        raise TransferkitError(f"cannot parse the overrides: {str(e).splitlines()[0]}. Fix: write them as key=value, "
                               f"sweeps as key=a,b or key='range(0,5)'{QUOTING}.") from e
    swept, axes = [o for o in overrides if not o.is_hydra_override()], []
    for o in swept:
        if not (o.is_sweep_override() or isinstance(o.value(), Glob)):  # one value, quotes kept: '1' is text
            axes.append([f"{o.get_key_element()}={o.get_value_element_as_str()}"])
            continue
        try:  # one pass: shuffle() would order a second one otherwise, and a repeat would name other values
            values = _glob(o) if isinstance(o.value(), Glob) else list(o.sweep_iterator())
        except (HydraException, ValueError) as e:  # interval(): only an optimising sweeper picks its points
            raise TransferkitError(f"cannot list the values of {o.input_line}: {str(e).splitlines()[0]}. Fix: list "
                                   f"them (key=a,b) or use key='range(start,stop,step)' with a step that is not 0"
                                   f"{QUOTING}.") from e
        if any(isinstance(v, Sweep) for v in values):
            raise TransferkitError(f"{o.input_line} puts a sweep among listed values. Fix: list every value "
                                   f"(key=1,2,3) or give one range() (key='range(1,4)'){QUOTING}.")
        if not values:
            raise TransferkitError(f"{o.input_line} lists no values. Fix: key='range(start,stop,step)' with start < "
                                   f"stop (start > stop when step < 0), or key=a,b.")
        same = [same_value(v) for v in values]
        if len(set(same)) < len(same):  # 1,1 or 1,1.0: one point twice, trained twice and counted twice
            first = next(i for i, v in enumerate(same) if same.count(v) > 1)
            a, b = (Override._get_value_element_as_str(values[i]) for i in (first, same.index(same[first], first + 1)))
            twice = f"{a} twice" if a == b else f"{a} and {b}, one value twice"
            raise TransferkitError(f"{o.input_line} lists {twice}. Fix: list each value once.")
        axes.append([f"{o.get_key_element()}={Override._get_value_element_as_str(v)}" for v in values])
    keys = [override_key(o.input_line) for o in swept]  # ++seed and seed set one key
    if twice := next((k for i, k in enumerate(keys) if len(axes[i]) > 1 and k in keys[i + 1:]), None):
        given = " and ".join(o.input_line for o, k in zip(swept, keys) if k == twice)
        raise TransferkitError(f"{twice} is given more than once ({given}): the last would set it in every point. "
                               f"Fix: give each swept key once.")
    return [list(point) for point in itertools.product(*axes)]


def _glob(override) -> list[str]:
    """glob()'s options of a config group, from conf/ (Hydra reads them through the config loader of a run)."""
    group = find_conf_dir() / override.key_or_group
    if not (options := override.value().filter(sorted(f.stem for f in group.glob("*.yaml")))):
        raise TransferkitError(f"{override.input_line} chooses none of the options of a config group in conf/ "
                               f"({override.key_or_group} is none, or none of its options match). Fix: list the "
                               f"values (key=a,b), or match a group's options (model='glob(fast*)').")
    return options


def made_with(stage: str) -> set[str]:
    """The config keys that change what `stage` computes, its own and those of every stage it reads."""
    keys = {k for k in BY_NAME[stage].params if k.split(".")[0] not in RUN_SETTINGS}
    return keys.union(*(made_with(r) for r in BY_NAME[stage].reads))


def check_read(stage: str, overrides: list[str], composed: bool = False) -> None:
    """Refuses an override of a setting `stage` does not read: it would change nothing but the params.yaml saved
    with the outputs. A stage's setting that follows another in conf/ (scratch.epochs: ${transfer.epochs}) follows
    it only where conf/ is `composed`, not in a params file, which holds values."""
    reads = {"name", *BY_NAME[stage].params, *made_with(stage), *SCORED_WITH, *RUN_SETTINGS}  # name: check_inputs
    given = {override_key(o): value_key(o) for o in overrides}  # a=.5 and a=0.5 alike
    for override in overrides:
        key = override_key(override)
        if under(key, reads) or any(under(r, [key]) for r in reads):
            continue
        raw = flatten(OmegaConf.to_container(OmegaConf.load(find_conf_dir() / "config.yaml"), resolve=False))
        follows = [k for k, v in raw.items() if v == f"${{{key}}}" and under(k, BY_NAME[stage].params)]
        m = re.fullmatch(r"\$\{([\w.]+)\}", str(raw.get(key, "")))  # the setting `key` follows in conf/, if any
        led = m[1] if m and under(m[1], BY_NAME[stage].params) else None  # and the stage reads: given alike, it runs
        value = override.partition("=")[2]  # a params file holds a follower's value: given alike, as composing sets it
        if follows and (composed or all(given.get(k) == given[key] for k in follows)) or led and given.get(led) == (
                given[key]):
            continue
        fix = (f"{follows[0]}={value}, or both alike ({override} {follows[0]}={value}): it follows {key} where conf/ "
               f"is composed, a params file holds its own value" if follows else
               f"give {led} the same value ({led}={value}), which {key} follows in conf/, or leave {key} out" if led
               else f"set what {stage} reads ({', '.join(BY_NAME[stage].params)})")
        raise TransferkitError(f"{stage} does not read {key}: '{override}' would change nothing but the params.yaml "
                               f"saved with its outputs. Fix: {fix}.")


def exp_run_sets(key: str) -> str:
    """`-S` for each override params.yaml records but `key`: DVC composes conf/ with the -S values
    alone, so an experiment without them would lose the project's own (experiment=smoke, say)."""
    base = project_overrides(find_conf_dir().parent / "params.yaml")
    return "".join(f"-S {shlex.quote(o)} " for o in base if override_key(o) != key)


def check_inputs(stage: str, cfg: DictConfig, given: set[str] | None = None, folders: dict | None = None,
                 params_file: Path | None = None) -> None:
    """A run reads the outputs of earlier stages under paths.artifacts_dir (or in `folders`, by stage), whatever its
    own settings say: a setting of theirs that differs (a swept pretrain.epochs, data.target.train_per_class) would
    make every point reuse one earlier result. Each output's saved params.yaml says what made it, and dvc.lock with
    what code. `given`: the keys the command line set (None: all); the others come from the project's params.yaml,
    so an output made with another value of one is older than params.yaml, not another sweep's. `params_file`: the
    run's (`--params`), where experiment= is no override."""
    mine = flatten(to_params(cfg))
    for name in BY_NAME[stage].reads:
        saved_file = Path((folders or {}).get(name) or Path(cfg.paths.artifacts_dir) / name) / "params.yaml"
        try:  # missing (not made yet) or unreadable: the stage checks the files it reads itself
            if not isinstance(data := read_yaml(saved_file), dict):
                continue
        except TransferkitError:
            continue
        saved, keys = flatten(data), made_with(name)
        if mine.get("name") != saved.get("name"):
            fix = (f"run with a params file of experiment={saved.get('name')} (`transferkit params "
                   f"experiment={saved.get('name')}` writes one), or give --in {name}=DIR, a folder {params_file} "
                   f"made" if params_file else f"add experiment={saved.get('name')} (and no name=, which it sets)")
            raise TransferkitError(f"{saved_file.parent} was made by experiment={saved.get('name')}, this run composes "
                                   f"experiment={mine.get('name')}, and {stage} reads it. Fix: {fix}.")
        if stale := stale_code(name, saved_file.parent, stage, find_conf_dir(required=False)):
            raise TransferkitError(stale)  # its settings may match: the code that ran with them does not
        # a key both have first: a key only one has follows from another that differs (model=vgg_mini has
        # no model.bn_momentum), or from code that changed since
        found = [k for k in sorted(differing(mine, saved), key=lambda k: k not in mine or k not in saved)
                 if under(k, keys)]
        # each setting the command line can give the input's value of, in one fix: not one error per attempt
        settable = [k for k in found if k in mine and k in saved  # model@distill.student: its package
                    and (given is None or under(k, (o.split("@")[-1] for o in given)))]
        if found:
            k, also = found[0], f" (and other values of {', '.join(found[1:])})" if len(found) > 1 else ""
            here, there = (f"{k}={json.dumps(d[k])}" if k in d else f"no {k}" for d in (mine, saved))
            values = " ".join(f"{x}={json.dumps(saved[x], separators=(',', ':'))}" for x in settable)
            fix = (f"run with {values}; to vary what {name} computes, run the pipeline once per value "
                   f"(`dvc exp run --queue {exp_run_sets(k)}-S {k}=...`)" if k in settable
                   else f"make it again with this code and config (`dvc repro {name}`)")
            raise TransferkitError(f"{here} here, but {saved_file.parent} was made with {there}{also}, "
                                   f"and {stage} reads it. Fix: {fix}.")


def pin_named_files(stage: str, cfg: DictConfig) -> list[str]:
    """The files the run's settings name (named_files), as absolute paths, set so in `cfg` too: its commands run
    in another folder (a sweep's or the scenarios' out/), and its dvc.yaml entry depends on them."""
    from transferkit.stages import named_files

    files = []
    for key, value in named_files(stage, to_params(cfg)).items():
        files.append(str(Path(value).resolve()))
        OmegaConf.update(cfg, key, files[-1])
    return list(dict.fromkeys(files))  # source and target may be one archive: one dep


def check_points(stage: str | None, argv: list[str], blocks: dict[str, int] | None = None, given: set[str] | None = None
                 ) -> list[tuple[list[str], DictConfig]]:
    """Compose and validate every point of the sweep; return each point's overrides and config.
    `blocks` caches each model config's block count across calls (validate_run); a `stage`'s points read
    earlier stages' outputs under paths.artifacts_dir (check_inputs); `given`: the keys the command line
    set, where the others come from the project's params.yaml (None: every key is the command line's)."""
    points = expand(argv)  # a line Hydra cannot parse is one error line there
    # Composing first makes a mistyped key (the commonest mistake) fail in well under a second, with the keys
    # conf/ has that look like it: the value checks below import torch and Lightning, which take seconds to load.
    composed = [compose(point) for point in points]
    if stage:  # one value of a setting the stage does not read would run it unchanged under another name
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
        conf_dir = find_conf_dir()
        check_read(stage, [o.input_line for o in parsed if not (o.is_hydra_override() or group_choice(o, conf_dir))
                           and (given is None or o.key_or_group in given)], composed=True)

    from transferkit.config.checks import check_frozen_sweep, validate_run

    blocks = {} if blocks is None else blocks
    for point, cfg in zip(points, composed):
        try:
            validate_run(cfg, stage, blocks)
            if stage:
                check_inputs(stage, cfg, given)
        except TransferkitError as e:
            if len(points) == 1:
                raise
            raise TransferkitError(f"sweep point [{' '.join(point)}]: {swept_fix(str(e), point)}") from e
    check_frozen_sweep(composed)
    if stage:  # points that differ in nothing the stage or collect reads: one run, trained twice, counted twice
        keys, seen = {*BY_NAME[stage].params, *made_with(stage), *SCORED_WITH}, {}  # and what collect scores with
        for point, cfg in zip(points, composed):
            run = json.dumps({k: v for k, v in flatten(to_params(cfg)).items()
                              if under(k, keys) and (k == "seed" or not under(k, NOT_SWEPT))}, sort_keys=True)
            if (twin := seen.setdefault(run, point)) is not point:
                a, b = (" ".join(o for o in p if o not in q) for p, q in ((twin, point), (point, twin)))
                unread = [override_key(o) for o in point if o not in twin]
                not_swept = all(under(k, NOT_SWEPT) for k in unread)  # read, but how a run shares the machine
                raise TransferkitError(f"the sweep points with {a} and with {b} are one {stage} run: " + (
                    f"a sweep names and scores its points without {', '.join(unread)}. Fix: set it once for the "
                    f"sweep, or run `transferkit {stage} {unread[0]}=VALUE` by hand once per value." if not_swept else
                    f"{stage} does not read {', '.join(unread)}. Fix: sweep settings {stage} reads "
                    f"({', '.join(BY_NAME[stage].params)}, and those of the stages it reads)."))
    return list(zip(points, composed))


def point_name(point: list[str], given: set[str]) -> str:
    """The point's overrides of the keys `given`, varying or not, as Hydra names its folders (seed=1,x=2): a point
    keeps its name when the sweep grows along an axis of one value, or gains a setting that changes no result
    (trainer.progress_bar), so DVC runs only the new points; a "/" in a value would make a subfolder."""
    return ",".join(sorted(o.replace("/", "%2F") for o in point if (k := override_key(o)) in given
                           and (k == "seed" or not under(k, NOT_SWEPT)))) or "default"


def main(argv: list[str]) -> int:
    from transferkit.evaluation.tables import sweep_table
    from transferkit.io import save_text
    from transferkit.project import WHY_LOCKED, ReproFailed, check_runs_folder, run_pipeline, stage_run
    from transferkit.stages.common import exclusive
    from transferkit.sweep.collect import collect

    parser = one_line_errors(argparse.ArgumentParser(prog="transferkit sweep", usage="%(prog)s STAGE key=a,b ... "
                                                     "[--out DIR]", description=__doc__.split("\n\n")[0]))
    parser.add_argument("stage", choices=TARGET_MODELS, help="a stage whose models collect scores")
    parser.add_argument("--out", type=Path, help="the sweep's folder (default sweeps/<experiment>-<stage>)")
    args, overrides = parser.parse_known_args(argv)
    if unknown := [o for o in overrides if o.startswith("-")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (the options: --out DIR; the rest: key=value)")
    if hydra := [o for o in overrides if override_key(o).startswith("hydra")]:
        raise TransferkitError(f"override '{hydra[0]}' cannot be used here: the points run as DVC stages, not through "
                               f"Hydra. Fix: leave it out, or run them as a Hydra multirun (`transferkit {args.stage} "
                               f"-m ...`), where hydra/launcher applies.")
    # the points read what params.yaml made: composed as it is, then with the overrides given here
    given, params_file = {override_key(o) for o in overrides}, find_conf_dir().parent / "params.yaml"
    recorded = project_overrides(params_file)
    if params_file.is_file() and (drift := params_drift(params_file)):  # `dvc exp run -S` records no overrides
        raise TransferkitError(f"params.yaml is not conf/ composed with {' '.join(recorded) or 'no overrides'} "
                               f"({drift[0]}{f'; {len(drift) - 1} more' if len(drift) > 1 else ''}), so the points "
                               f"could not compose as it is. {regenerate_fix(params_file).rstrip('.')}; then sweep.")
    base = [o for o in recorded if override_key(o) not in given]
    points, cfgs = map(list, zip(*check_points(args.stage, [*base, *overrides], given=given)))
    out = (args.out or Path("sweeps") / f"{cfgs[0].name}-{args.stage}").resolve()
    check_runs_folder(out, by := f"sweep {args.stage}")  # the command the folder's runs come from
    # DVC would stop at a missing input only after removing the points' earlier outputs (run_pipeline refuses)
    if missing := [p for n in BY_NAME[args.stage].reads if not (p := Path(cfgs[0].paths.artifacts_dir) / n).is_dir()]:
        n, here = missing[0].name, (params_file.parent / missing[0]).is_dir()
        fix = (f"make it (`transferkit {n}` with the same paths.artifacts_dir; `dvc repro {n}` fills the project's "
               f"own folder), or sweep without paths.artifacts_dir" if "paths.artifacts_dir" in given else
               f"{'' if here else f'make it (`dvc repro {n}`) and '}sweep in the project's folder {params_file.parent}")
        raise TransferkitError(f"{missing[0].resolve()} does not exist, and {args.stage} reads it. Fix: {fix}.")
    with exclusive(out, WHY_LOCKED):  # from its params files to the table of the points its dvc.yaml lists
        stages, code, names = {}, code_files(BY_NAME[args.stage]), [point_name(p, given) for p in points]
        for i, (name, cfg) in enumerate(zip(names, cfgs)):
            artifacts, files = Path(cfg.paths.artifacts_dir).resolve(), pin_named_files(args.stage, cfg)
            save_text(params_text(cfg), out / "params" / f"{name}.yaml")  # DVC sees content: a rewrite changes nothing
            # DVC watches the settings the stage's dvc.yaml entry tracks and those collect scores with: no others
            keys = tracked_params(BY_NAME[args.stage].params, list(cfg.trainer))
            stages[f"point{i}"] = stage_run(args.stage, f"params/{name}.yaml", f"{name}/{args.stage}",
                                            {r: str(artifacts / r) for r in BY_NAME[args.stage].reads}, [*code, *files],
                                            [*keys, *SCORED_WITH])
        try:
            ran = run_pipeline(out, stages, labels=dict(zip(stages, map("point {}".format, names))), by=by)
        except ReproFailed:  # a point failed, the others ran: their table first (collect names the failed one)
            try:
                print(sweep_table(collect([out], out / "collected")))
            except Exception as e:  # a courtesy: the failure is the error to report
                print(f"transferkit sweep: no table of the points that finished: {e}", file=sys.stderr)
            raise
        done = len(stages) - len(ran)
        print(f"{len(ran)} of {len(stages)} points ran" + (f"; {done} done already" if done else ""))
        # this sweep's points only, those its dvc.yaml lists: out/ may keep the points of an earlier, other sweep
        print(sweep_table(collect([out], out / "collected")))
    where = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"Each point's outputs are in {where}/POINT/{args.stage}/, this table in {where}/collected/sweep.md.")
    return 0
