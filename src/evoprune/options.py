"""Option fields: how a frozen config dataclass describes its options once, for the library, recipes and the CLI.

Owns :func:`opt` (a ``dataclasses.field`` carrying the option's help text and CLI name), :class:`Option`
(what one field means to the outside: flag, type, default, help), :func:`options_of` (the options of a
config class, in field order) and :func:`parse_bool` / :func:`parse_ints` (the value syntax shared by
recipe files and flags). Pure Python.

A config class owns its defaults and its validation (``__post_init__``); everything else reads them from
here: the CLI generates its flags (:mod:`evoprune.cli.options`), recipe files and run records use the
field names, and a default is written exactly once, on the field. Field metadata:

- ``help``: one line; ``flag``: the CLI name when it differs from the field name (``owl_lambda`` for
  ``lam``), ``aliases``: more CLI names; ``choices``: allowed values;
- ``cli=False``: an internal knob (no flag, still settable from Python and recipes).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["opt", "Option", "options_of", "parse_bool", "parse_ints", "parse_names", "parse_value",
           "describe_default"]

_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
        choices: tuple | None = None, cli: bool = True, kind: str | None = None, default_factory: Any = _MISSING,
        legacy: Any = _MISSING):
    """A dataclass field that is a user-facing option (see the module docstring); ``kind`` overrides the
    value syntax read from the annotation (e.g. ``"names"``: comma-separated strings); ``legacy``: the value
    a run record written before the option existed means (the behaviour it ran with), when it differs
    from ``default``."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "cli": cli, "kind": kind}
    if legacy is not _MISSING:
        meta["legacy"] = legacy
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One option of a config class: ``field`` (the dataclass field name), ``flag`` (its CLI name, dashes
    as underscores), ``kind`` (``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"ints"``: a tuple of ints,
    ``"names"``: a tuple of strings, or ``"any"``), ``default``, ``help``, ``choices``, ``cli``, ``aliases``."""

    field: str
    flag: str
    kind: str
    default: Any
    help: str
    choices: tuple | None
    cli: bool
    aliases: tuple[str, ...]


def _kind(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = args[0]
    origin = typing.get_origin(base) or base
    if base is bool:
        return "bool"
    if base is int:
        return "int"
    if base is float:
        return "float"
    if base is str:
        return "str"
    if origin is tuple:
        return "ints"
    return "any"


def options_of(cls) -> list[Option]:
    """The options of config dataclass ``cls`` in field order (inherited fields first)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata or {}
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        kind = meta.get("kind") or _kind(hints.get(f.name, Any))
        out.append(Option(f.name, meta.get("flag") or f.name, kind, default,
                          meta.get("help", ""), meta.get("choices"), bool(meta.get("cli", True)),
                          tuple(meta.get("aliases", ()))))
    return out


def parse_bool(text: str | bool) -> bool:
    """``on|off``, ``true|false``, ``yes|no``, ``1|0`` (any case) -> bool; ``ValueError`` otherwise."""
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"expected on or off, got {text!r}")


def parse_ints(text) -> tuple[int, ...]:
    """``"512,2048"`` (or a sequence of ints) -> ``(512, 2048)``; ``ValueError`` otherwise."""
    parts = [p for p in str(text).replace(" ", ",").split(",") if p] if isinstance(text, str) else list(text)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if any(isinstance(p, float) and not math.isfinite(p) for p in parts):
        raise ValueError(f"expected integers, got {text!r}")
    return out


def parse_stages(text):
    """``"auto"`` stays ``"auto"``, ``"none"`` / ``"off"`` become ``"none"`` (one stage: the config turns it into
    ``None``; a parsed ``None`` would read as "not given" and leave a default of ``"auto"`` in place); anything
    else as :func:`parse_ints`."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    if isinstance(text, str) and text.strip().lower() in ("none", "off"):
        return "none"
    return parse_ints(text)


def parse_names(text) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` (or a sequence of strings) -> ``("q_proj", "v_proj")``."""
    parts = str(text).split(",") if isinstance(text, str) else [str(x) for x in text]
    return tuple(p.strip() for p in parts if p.strip())


def parse_value(option: Option, value):
    """``value`` (a string from the command line, or a value from a recipe file) in ``option``'s kind;
    ``ValueError`` when it does not parse. ``None`` stays ``None``."""
    if value is None:
        return None
    kind = option.kind
    if kind == "bool":
        return parse_bool(value)
    if kind == "ints":
        return parse_ints(value)
    if kind == "stages":
        return parse_stages(value)
    if kind == "names":
        return parse_names(value)
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if kind == "float":
            return float(value)
        if isinstance(value, float) and value != int(value):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if kind == "str":
        return str(value)
    return value


def describe_default(value) -> str:
    """A default as the CLI help shows it (``on``/``off`` for bools, ``512,2048`` for tuples, ``-`` for None)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)
