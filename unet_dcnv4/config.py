"""The config toolkit of both trainers: a dataclass's defaults, then a YAML file of differences, then `key=value`
overrides, validated with errors that name the key; printed and saved beside the run; a command line with
`--config`, named flags, `--set` and `--dry_run`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml

__all__ = ["CONFIG_FILE", "field_types", "coerce_fields", "choice", "at_least", "parse_overrides", "apply_values",
           "resolve", "to_dict", "to_yaml", "save_config", "field_comments", "keys_help", "add_arguments",
           "resolve_arguments"]

# The resolved config beside a run and inside each checkpoint.
CONFIG_FILE = "config.yaml"


def field_types(cls) -> dict[str, tuple[type, ...]]:
    """The accepted Python types of every field of the dataclass `cls`, from its annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            out[f.name] = tuple(typing.get_args(hint))
        else:
            out[f.name] = (typing.get_origin(hint) or hint,)
    return out


def _coerce(key: str, value, accepted: tuple[type, ...]):
    """Returns value as one of the accepted types or raises a ValueError naming the key."""
    if value is None and type(None) in accepted:
        return None
    if isinstance(value, bool):
        if bool in accepted:
            return value
    elif float in accepted and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(value, accepted):
        return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
    raise ValueError(f"config key '{key}' must be {names}, got {value!r}")


def coerce_fields(cfg) -> None:
    """Checks the type of every field of the dataclass instance `cfg` (ints become floats where a float is
    expected); raises ValueError naming the key, the value and the expected type."""
    for key, accepted in field_types(type(cfg)).items():
        setattr(cfg, key, _coerce(key, getattr(cfg, key), accepted))


def choice(cfg, key: str, options: typing.Iterable[str]) -> None:
    """Raises ValueError unless the field `key` of `cfg` is one of `options`."""
    value, options = getattr(cfg, key), tuple(options)
    if value not in options:
        raise ValueError(f"config key '{key}' must be one of {', '.join(options)}, got {value!r}")


def at_least(cfg, key: str, low) -> None:
    """Raises ValueError if the field `key` of `cfg` is below `low` (None passes)."""
    value = getattr(cfg, key)
    if value is not None and value < low:
        raise ValueError(f"config key '{key}' must be >= {low}, got {value!r}")


def parse_overrides(items: typing.Iterable[str]) -> dict:
    """Parses ["key=value", ...] into a dict; each value is read as YAML (numbers, booleans, null, lists, dicts).

    Args:
        items: strings of the form "key=value".
    """
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override must look like key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r} has a value that is not valid YAML: {err.problem}") from err
    return out


def apply_values(cfg, values: dict, origin: str) -> None:
    """Sets the fields of `cfg` from `values`; an unknown key is a ValueError naming it, `origin` and the valid keys."""
    valid = [f.name for f in dataclasses.fields(cfg)]
    for key, value in values.items():
        if key not in valid:
            raise ValueError(f"unknown config key '{key}' in {origin}; valid keys: {', '.join(valid)}")
        setattr(cfg, key, value)


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys, got {type(values).__name__}")
    return values


def resolve(cls, path: str | os.PathLike | None = None, overrides: dict | typing.Iterable[str] = (),
            validate: typing.Callable | None = None):
    """Resolves a config: the defaults of the dataclass `cls`, then the YAML file, then the overrides.

    Args:
        cls: the config dataclass.
        path: a YAML file holding a mapping of config keys (a small diff over the defaults), or None.
        overrides: a dict of keys to values, or "key=value" strings (values read as YAML).
        validate: checks the resolved config in place and raises ValueError naming the key; None checks the
            field types only (`coerce_fields`).

    Returns:
        The validated config. Raises ValueError for unknown keys or invalid values, FileNotFoundError for a
        missing file.
    """
    cfg = cls()
    if path is not None:
        apply_values(cfg, _read_yaml_mapping(Path(path)), str(path))
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    apply_values(cfg, overrides, "the overrides")
    (validate or coerce_fields)(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """The config as a plain dict (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The config as YAML text, keys in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, folder: str | os.PathLike) -> Path:
    """Writes the resolved config as `CONFIG_FILE` into `folder` (created); returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    path.write_text(to_yaml(cfg))
    return path


def field_comments(cls) -> list[tuple[str | None, str, list[str], str | None]]:
    """The fields of the dataclass `cls` in order, with the comments its source gives them, as
    (group, name, lines above, comment after): a comment block after a blank line heads a group of fields, one
    right above a field describes that field, and a comment on the field's line follows it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {}  # line number (1-based) -> comment text without "#"
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    names = {f.name for f in dataclasses.fields(cls)}
    out, group = [], None
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names):
            continue
        above, row = [], node.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        if above and (row < 1 or not lines[row - 1].strip() or lines[row - 1].strip().endswith('"""')):
            group, above = " ".join(above), []  # after a blank line (or the docstring): a group's heading
        out.append((group, node.target.id, above, comments.get(node.lineno)))
    return out


def keys_help(cls) -> str:
    """Every key of the dataclass `cls` with its default, grouped and commented as in its source, laid out as
    a YAML config file: the text `--help` ends with."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    text, group = ["config keys and their defaults (set them in a --config YAML file or with --set KEY=VALUE):"], None
    for heading, name, above, after in field_comments(cls):
        if heading != group:
            group = heading
            text += ["", f"  # {heading}"]
        text += [f"  # {line}" for line in above]
        value = yaml.safe_dump({name: defaults[name]}, default_flow_style=True, width=1000).strip()[1:-1]
        text.append(f"  {value}" + (f"  # {after}" if after else ""))
    return "\n".join(text)


def add_arguments(parser: argparse.ArgumentParser, cls, flags: dict[str, str]) -> None:
    """Adds `--config FILE`, a flag per key of `flags` ({field name: help}), `--set KEY=VALUE` and `--dry_run`.

    A named flag takes the field's type (a bool field gives `--name/--no-name`) and defaults to None, which
    leaves the key to the file and the defaults. `--help` ends with every key (`keys_help`).
    """
    parser.epilog = keys_help(cls)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    types_ = field_types(cls)
    parser.add_argument("--config", default=None, help="YAML file of config keys over the defaults")
    for name, help_text in flags.items():
        accepted = [t for t in types_[name] if t is not type(None)]
        if accepted == [bool]:
            # `type=bool` would read "--flag false" as True.
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = accepted[0] if accepted[0] in (int, float) else str
            parser.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (value read as YAML); repeatable")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and stop")


def resolve_arguments(args: argparse.Namespace, cls, flags: typing.Iterable[str],
                      validate: typing.Callable | None = None) -> tuple[typing.Any, bool]:
    """The config of parsed `add_arguments` flags: defaults, `--config`, `--set`, then the named flags given.

    Returns:
        (config, dry_run). Raises ValueError on unknown keys or invalid values.
    """
    overrides = parse_overrides(args.overrides)
    overrides.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    return resolve(cls, args.config, overrides, validate), args.dry_run
