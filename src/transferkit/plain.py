"""Plain data, below the config: YAML read without aliases or runaway nesting (a params.yaml someone sent), JSON
nested deeper than the parser reads refused as damage, and nested dicts as flat dotted keys (what configs, saved
params and metrics are compared by)."""

from __future__ import annotations

import json

import yaml


class _NoAliases(yaml.SafeLoader):
    """YAML without aliases (*name): the files transferkit writes hold none, and aliases of aliases multiply what
    reading builds, a few kilobytes to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "an alias (*name), which no file transferkit writes holds",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def dvc_file_data(text: str):
    """The data of a dvc.yaml or dvc.lock, with libyaml's parser where PyYAML has it: a SafeLoader's plain values,
    read in a fraction of the pure-Python parser's time (a sweep reads dvc.lock once an input of each point)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


MAX_DEPTH = 32  # a params file nests four deep; OmegaConf and flatten recurse once a level


def out_paths(entry: dict) -> list[str]:
    """A dvc.yaml stage's output paths, each written as a path or as {path: options} (persist: true)."""
    return [next(iter(o)) if isinstance(o, dict) else o for o in entry.get("outs") or []]


def plain_yaml(text: str):
    """The data of a params.yaml, which a stranger may have sent: plain values, no aliases, a sane depth."""
    too_deep = yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep, where a params file nests a few")
    try:
        data = yaml.load(text, Loader=_NoAliases)  # a SafeLoader: plain values only
    except RecursionError:  # deeper than the parser reads
        raise too_deep from None
    below = [(data, 0)]
    while below:
        item, depth = below.pop()
        if depth >= MAX_DEPTH:
            raise too_deep
        below += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
                  if isinstance(v, (dict, list))] if isinstance(item, (dict, list)) else []
    return data


def plain_json(text: str):
    """json.loads, with arrays or objects nested thousands deep (RecursionError, which no caller expects) raised as
    the ValueError any other damage is."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise ValueError(str(e)) from None


def under(key: str, prefixes) -> bool:
    """Whether the flattened `key` is one of `prefixes` or inside one (transfer.lr is under transfer)."""
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def flatten(obj, lists: bool = False, prefix: str = "") -> dict[str, object]:
    """{'models': {'transfer': {'top1': 0.5}}} -> {'models.transfer.top1': 0.5}; with `lists`,
    list items too, by index."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if lists and isinstance(obj, list) else None
    if not items:
        return {prefix: obj}
    return {k: v for key, value in items
            for k, v in flatten(value, lists, f"{prefix}.{key}" if prefix else str(key)).items()}


def differing(a: dict, b: dict) -> list[str]:
    """The keys of two flattened configs whose values differ (a key only one has counts), sorted."""
    return [k for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
