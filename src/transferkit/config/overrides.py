"""Overrides (key=value, as Hydra, `dvc exp run -S` and `transferkit params` read them): the key each sets,
one value a key, values that compose alike, and a value written back as one."""

from __future__ import annotations

import re

from transferkit.errors import TransferkitError


def override_key(override: str) -> str:
    """The key an override sets: `+a.b=1`, `~a.b` and `a.b=1` all set a.b."""
    return override.split("=", 1)[0].lstrip("+~")


SETTING_FIX = "Fix: set {key} in conf/ or as an override"  # config.schema.fail's, which swept_fix finds


def swept_fix(message: str, point: list[str]) -> str:
    """A setting's refusal (config.schema.fail) for a sweep point that sets it: the fix is the sweep's value, not
    conf/ or `transferkit params`."""
    fix = re.search(re.escape(SETTING_FIX).replace(re.escape("{key}"), r"(\S+)") + ".*$", message)
    given = [o.split("=", 1)[1] for o in point if "=" in o and fix and override_key(o) == fix[1]]
    return message[:fix.start()] + f"Fix: change {given[0]} among the sweep's values of {fix[1]}." if given else message


def refuse_repeats(overrides: list[str]) -> None:
    """One value a key: Hydra keeps the last of a key given twice, and the first would look applied."""
    keys = [override_key(o) for o in overrides if "=" in o]
    if twice := next((k for k in keys if keys.count(k) > 1), None):
        given = " and ".join(o for o in overrides if "=" in o and override_key(o) == twice)
        raise TransferkitError(f"{twice} is given twice ({given}), and a run has one value of it. Fix: give it once.")


def same_value(value) -> tuple:
    """A value Hydra parsed, as a key equal for values that compose alike: 1 and 1.0 are one number, 'a' and a one
    string, true no number, [1,2] and [1,2.0] one list, {a:1,b:2} and {b:2,a:1} one dict, nan and nan one value."""
    if isinstance(value, list):
        return "list", tuple(same_value(v) for v in value)
    if isinstance(value, dict):
        return "dict", frozenset((same_value(k), same_value(v)) for k, v in value.items())
    value = getattr(value, "text", value)  # a QuotedString
    return ("nan",) if value != value else (type(value) is bool, value)  # nan alone is not equal to itself


def value_key(override: str) -> tuple:
    """An override's value as same_value keys it, read as Hydra reads it: a=.5 and a=0.5 set one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return same_value(OverridesParser.create().parse_override(override).value())
    except HydraException:  # Hydra refuses it where it composes; as text meanwhile
        return "text", override.partition("=")[2]


def as_override(value) -> str:
    """`value` as an override writes it, by Hydra's own writer: [bird, cat], null, inf, a\\,b. A string Hydra reads
    as another value, or not at all, unquoted ('1', "it's", a newline) comes back otherwise; the settings scenarios
    name hold none."""
    from hydra.core.override_parser.types import Override

    return Override._get_value_element_as_str(value, space_after_sep=True)
