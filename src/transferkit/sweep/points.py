"""The points of a Hydra sweep, checked before any of them runs, and skipped when a
previous (crashed or interrupted) sweep already finished them.

Hydra itself only finds a bad value when it reaches that job, after the earlier points
have trained for minutes; expanding the sweep up front makes a typo or an out-of-range
depth fail at once, with the same one-line message a single run gives.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml
from omegaconf import DictConfig

from transferkit.config.compose import compose, to_params
from transferkit.errors import TransferkitError
from transferkit.stages.common import PARAMS_FILE

# Settings that change how a run looks, not what it computes: ignored when a finished
# point is compared with the one about to run.
COSMETIC = ("trainer.progress_bar", "trainer.loggers")


def expand(argv: list[str]) -> list[list[str]]:
    """Every combination of the sweep values in `argv` (Hydra's own parser: a=1,2, range(),
    choice(), glob()), as plain override lists; hydra.* settings are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    plain = [a for a in argv if not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except HydraException as e:
        raise TransferkitError(f"cannot parse the overrides: {e}. Fix: write them as key=value, "
                               f"sweeps as key=a,b or key='range(0,5)'.") from e
    axes = []
    for o in overrides:
        if o.is_hydra_override():
            continue
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def check_points(stage: str, argv: list[str]) -> int:
    """Compose and validate every point of the sweep; return how many there are."""
    points = expand(argv)
    # Composing first makes a mistyped key (the commonest mistake) fail in well under a second:
    # the value checks below import torch and Lightning, which take seconds to load.
    composed = [compose(point) for point in points]

    from transferkit.config.validate import validate, validate_probe, validate_transfer
    from transferkit.models import model_from_config

    blocks: dict[str, int] = {}  # model config -> number of blocks (building a model is cheap, but not free)
    for point, cfg in zip(points, composed):
        try:
            validate(cfg)
            if stage in ("transfer", "probe"):
                model_cfg = to_params(cfg.model)
                key = repr(model_cfg)
                if key not in blocks:
                    blocks[key] = model_from_config(model_cfg, 2).num_blocks
                (validate_transfer if stage == "transfer" else validate_probe)(cfg, blocks[key])
        except TransferkitError as e:
            if len(points) == 1:
                raise
            raise TransferkitError(f"sweep point [{' '.join(point)}]: {e}") from e
    return len(points)


def _flat(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], d


def config_difference(a: dict, b: dict, ignore=COSMETIC) -> list[str]:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    return [f"{k}: {fa.get(k, '<missing>')!r} vs {fb.get(k, '<missing>')!r}"
            for k in sorted(set(fa) | set(fb))
            if k not in ignore and fa.get(k, "<missing>") != fb.get(k, "<missing>")]


def already_done(out: Path, cfg: DictConfig,
                 fix: str = "sweep into a new folder (hydra.sweep.dir=...)") -> bool:
    """True when `out` holds this exact point's finished outputs (a stage folder only
    appears once its stage succeeded: see stages.common.staged_output). A folder made by
    a different config is an error rather than silently reused or overwritten; `fix` is
    the caller's way out, named in that error."""
    saved = out / PARAMS_FILE
    if not saved.exists():
        return False
    diff = config_difference(yaml.safe_load(saved.read_text()), to_params(cfg))
    if diff:
        raise TransferkitError(
            f"{out} already holds a finished run made with a different config ({'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}). Fix: {fix} or delete {out}.")
    return True
