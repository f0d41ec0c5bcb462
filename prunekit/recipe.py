"""Recipes: a PruneConfig kept in a YAML or JSON file, so a prune is written down once and rerun exactly.

A recipe is either a plain PruneConfig mapping or a saved `prunekit.json` run record (its "config" key):
pointing `--config` at a pruned model's prunekit.json reproduces that run. Flags typed on the command
line override the recipe; flags left at their defaults do not, which is why the CLI needs
`explicit_args` to tell the two apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

from .config import PruneConfig, parse_pattern
from .errors import PrunekitError

RUN_KEYS = ("model", "calib", "eval", "eval_seqlen", "eval_windows")  # what a record adds beside its config


def _yaml_loader():
    """SafeLoader with YAML 1.2 numbers. YAML 1.1 reads `pattern: 2:4` as the base-60 integer 124 and
    `epsilon: 1e-3` as a string; both would reach PruneConfig as nonsense."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(int_tag, re.compile(r"^[-+]?(?:[0-9]+|0x[0-9a-fA-F]+)$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver(
        float_tag, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Loader


def read_mapping(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file holding one mapping; any problem is one line naming the file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise PrunekitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.lower().endswith((".yaml", ".yml")):
        import yaml
        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except (yaml.YAMLError, ValueError) as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise PrunekitError(f"{path} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrunekitError(
                f"{path} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise PrunekitError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "None": (type(None),)}


def check_types(data: dict, source: str) -> dict:
    """Refuse values of the wrong type (PruneConfig would fail later with a TypeError, or not at all),
    and make float fields floats, so 1 and 1.0 give the same config and the same sweep cell id."""
    out = dict(data)
    for f in dataclasses.fields(PruneConfig):
        if f.name not in data:
            continue
        value, names = data[f.name], [t.strip() for t in str(f.type).split("|")]
        allowed = tuple(t for n in names for t in _TYPES.get(n, (object,)))
        if not isinstance(value, allowed) or (isinstance(value, bool) and "bool" not in names):
            raise PrunekitError(f"{source}: {f.name} must be {' or '.join(names)}, got {value!r}")
        if "float" in names and isinstance(value, int):
            out[f.name] = float(value)
    return out


def config_mapping(data: dict, source: str) -> dict:
    """The PruneConfig part of a loaded file: the record's "config", or the whole mapping."""
    if isinstance(data.get("config"), dict):
        data = data["config"]
    return check_types(data, source)


def load_recipe(path: str) -> dict:
    """The PruneConfig mapping a recipe file holds, checked (unknown keys refused, values valid) but
    not yet merged with command-line flags; returned as a dict so `merge` can still apply them."""
    recipe = config_mapping(read_mapping(path), path)
    try:
        PruneConfig.from_dict(recipe)
    except PrunekitError as exc:
        raise PrunekitError(f"{path}: {exc}") from None
    return recipe


def recorded_run(path: str) -> dict:
    """model, calib, eval, ... of a saved prunekit.json record (empty for a plain recipe), so the CLI
    can reproduce a run without the user retyping them; typed flags still win."""
    data = read_mapping(path)
    return {k: data[k] for k in RUN_KEYS if k in data and data[k] is not None} if "config" in data else {}


def merge(recipe: dict, overrides: dict) -> PruneConfig:
    """Recipe values, then the typed flags over them. A recipe sparsity that only restates its N:M
    pattern (saved records store the resolved N/M) follows a typed --pattern instead of clashing."""
    recipe = dict(recipe)
    if "pattern" in overrides and "sparsity" not in overrides and recipe.get("sparsity") is not None:
        nm = parse_pattern(recipe.get("pattern", "unstructured"))
        if nm and abs(recipe["sparsity"] - nm[0] / nm[1]) < 1e-9:
            del recipe["sparsity"]
    return PruneConfig.from_dict({**recipe, **check_types(overrides, "command line")})


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from _all_actions(sub)


def explicit_args(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The argparse dests the user actually typed in argv (subcommand names excluded).

    Parses argv a second time with every default set to SUPPRESS, so only typed options land in the
    namespace; `--sparsity 0.5` counts as typed even though it equals the default. Call it after the
    normal parse (which reports usage errors); the parser is restored afterwards."""
    actions = [a for a in _all_actions(parser) if not isinstance(a, argparse._SubParsersAction)]
    saved = [(a, a.default, a.required) for a in actions]
    parsers = [parser] + [p for a in _all_actions(parser) if isinstance(a, argparse._SubParsersAction)
                          for p in dict.fromkeys(a.choices.values())]
    saved_defaults = [(p, p._defaults) for p in parsers]
    try:
        for a in actions:
            a.default, a.required = argparse.SUPPRESS, False
        for p in parsers:
            p._defaults = {}
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
        for p, defaults in saved_defaults:
            p._defaults = defaults
    subcommand_dests = {a.dest for a in _all_actions(parser) if isinstance(a, argparse._SubParsersAction)}
    return set(vars(namespace)) - subcommand_dests


def overrides_from_args(args: argparse.Namespace, explicit: set[str]) -> dict:
    """Typed flags as PruneConfig keys: `--sparsity` -> sparsity, `--no-bias-update` -> bias_update=False
    (a typed `--no-X` store_true flag sets X to the opposite). Non-config flags (--model, --out) are left out."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    out = {}
    for dest in explicit:
        value = getattr(args, dest)
        if dest in fields:
            out[dest] = value
        elif dest.startswith("no_") and dest[3:] in fields and isinstance(value, bool):
            out[dest[3:]] = not value
    return out


def save_recipe(config: PruneConfig, path: str) -> None:
    """Write a config as a recipe (YAML or JSON by extension), atomically; load_recipe reads it back."""
    data = config.to_dict()
    if path.lower().endswith((".yaml", ".yml")):
        import yaml
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
