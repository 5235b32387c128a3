"""The generic half of the configuration: TOML tables into checked dataclasses, and back.

Knows no section of the pipeline's config (those are ``pipeline.config.schema``): any dataclass whose fields
carry their documentation (``doc``) is built from a table by ``from_table``, with unknown keys and wrong types
reported by their dotted key. Config files may name a ``base`` file (``read_config_file``), and
``--section.key=value`` overrides apply to the raw table (``apply_override``) before it is built.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipeline.core.errors import ConfigError

T = TypeVar("T")


def doc(default: Any, text: str) -> Any:
    """A dataclass field with its default and its one-line documentation (what ``--help-config`` prints
    beside it). A list default is a ``field(default_factory=..., metadata={"doc": ...})`` of its own."""
    return field(default=default, metadata={"doc": text})


def check_numbers(
    section: Any, prefix: str, *, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None
) -> None:
    """The range checks of one section, in one line per key: every float of ``section`` (a list's too) is
    finite (NaN passes every comparison, so ``lr <= 0`` alone lets it through), each ``at_least`` key is >= its
    bound and each ``above`` key > its bound. ``prefix`` is the section's name in the message ("optim.")."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{prefix}{f.name} = {value}: must be a finite number")
    for name, low in (at_least or {}).items():
        if getattr(section, name) < low:
            raise ConfigError(f"{prefix}{name} = {getattr(section, name)}: must be >= {low:g}")
    for name, low in (above or {}).items():
        if getattr(section, name) <= low:
            raise ConfigError(f"{prefix}{name} = {getattr(section, name)}: must be > {low:g}")


def describe_path(path: str | Path) -> str:
    """What is at ``path``, worded for an error: "does not exist", "is a directory", "is a file" (or "is neither a
    file nor a directory"), so a path of the wrong kind says what it is instead of "does not exist"."""
    p = Path(path)
    if p.is_dir():
        return "is a directory"
    if p.is_file():
        return "is a file"
    return "is neither a file nor a directory" if p.exists() else "does not exist"


# --------------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "tables"
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, noun: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected, and a
    table where a dataclass is expected is built into one."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            header = f"[[{key.rsplit('[', 1)[0]}]]" if key.endswith("]") else f"[{key}]"  # a list's entry: [[key]]
            raise ConfigError(f"{key} must be a table ({header}), got {value!r}")
        return _build(tp, value, f"{key}.", noun)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list of {_type_name(inner)}")
        return [_coerce(v, inner, f"{key}[{i}]", noun) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table ([{key}]), got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, noun)
            except ConfigError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}")
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against a plain type (bool, int, float, str; other types pass as they are)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if tp in (float, str) and not isinstance(value, tp):
        raise ConfigError(f"{key} = {value!r}: expected {tp.__name__}")
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str, noun: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            table = prefix.rstrip(".")
            where = "the top level" if not table else table if table.endswith("]") else f"[{table}]"
            raise ConfigError(f"unknown {noun} '{prefix}{key}' in {where}; allowed keys: {', '.join(sorted(names))}")
    return cls(**{name: _coerce(value, hints[name], f"{prefix}{name}", noun) for name, value in data.items()})


def from_table(cls: type[T], data: dict[str, Any], *, noun: str = "config key") -> T:
    """Build the dataclass ``cls`` from a TOML table: unknown keys and wrong types are errors naming the
    dotted key (``noun`` words the unknown-key error), nested dataclasses and lists of them are built from
    their tables, and each dataclass checks its values as it is built."""
    return _build(cls, data, "", noun)


def merge_tables(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``into``, in place: tables merged key by key, lists and scalars replaced."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge_tables(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


def _parse_value(text: str) -> Any:
    """TOML literal if it parses (numbers, booleans, lists, quoted strings), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``--section.key=value`` (or ``section.key=value``) override to a raw config dict."""
    body = item[2:] if item.startswith("--") else item
    if "=" not in body:
        raise ConfigError(f"override {item!r} has no '=': write it as --section.key=value (e.g. --optim.lr=0.4)")
    key, text = body.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
    node[parts[-1]] = _parse_value(text.strip())


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's table with its chain of ``base`` files merged under it (the file's keys win).

    A base's ``name`` is dropped: the file given names the run, never a base."""
    return _read_chain(Path(path), named_by=None, chain=())


def read_toml(path: Path, *, what: str) -> dict[str, Any]:
    """The table of a TOML file; ``what`` names the file in the error when it does not parse."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} is not valid TOML: {e}") from e


def _read_chain(p: Path, *, named_by: Path | None, chain: tuple[Path, ...]) -> dict[str, Any]:
    what = f"config file {str(p)!r}" if named_by is None else f"base {str(p)!r} (named by {str(named_by)!r})"
    data = read_toml(p, what=what)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{what}: base = {base!r}: expected the path of another config file, relative to this one")
    path = p.parent / base
    if not path.is_file():
        raise ConfigError(
            f"{what} names base = {base!r}, but {str(path)!r} {describe_path(path)}, expected a TOML file (a base "
            f"is found relative to the file that names it)"
        )
    here = (*chain, p.resolve())
    if path.resolve() in here:
        loop = " -> ".join(str(x) for x in (*here, path.resolve()))
        raise ConfigError(
            f"{what} names base = {base!r}, which is already in its chain of bases ({loop}): a "
            f"cycle; remove one of the base keys"
        )
    inherited = _read_chain(path, named_by=p, chain=here)
    inherited.pop("name", None)  # a base never names the run
    return merge_tables(inherited, data)


def param_value(v: Any) -> str:
    """A config value as an MLflow param or tag string: booleans lower-case as in TOML (one spelling, so a filter
    ``params.x = 'true'`` finds every run), lists as JSON, anything else as ``str``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v) if isinstance(v, list) else str(v)


def flatten(cfg: Any) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params (of a config dataclass, or of a part of one as a dict)."""
    out: dict[str, str] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = param_value(v)

    walk(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg), "")
    return out


def _toml_value(v: Any) -> str:
    """A TOML literal for a config value (floats as Python's shortest repr, which reads back exactly)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: Any) -> str:
    """Serialise a resolved config dataclass as TOML (written next to the run's outputs): its scalars at the top,
    then one table per section."""
    d = dataclasses.asdict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def describe_fields(obj: Any) -> str:
    """Every key of the dataclass instance ``obj`` with its value and its documentation (the field's ``doc``),
    as a TOML file.

    One line per key, ``section.key = default  # documentation``: a dotted key is TOML for a key of the
    table ``[section]``, and is spelt as on the command line (``--section.key=value``)."""
    lines: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"{prefix}{f.name} = {_toml_value(value)}  # {f.metadata.get('doc', '')}")

    walk(obj, "")
    return "\n".join(lines)
