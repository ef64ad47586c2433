"""Command-line flags generated from the config dataclasses: a default is written once, on its field.

Owns :func:`add_options` (one config class -> its flags, with the class's defaults in the help),
:func:`add_search_options` (every section of every space and method: the ``search`` command's flags,
each method option once, its per-method defaults listed), :func:`given` (the flags the user actually
gave, as flat option names) and the value syntax of flags (:func:`evoprune.options.parse_value`):
``--flag`` / ``--flag on|off`` / ``--no-flag`` for booleans, ``512,2048`` for integer lists.

Why not ``transformers.HfArgumentParser`` or typer: both map one dataclass to one set of flags with
that dataclass's defaults. ``search`` needs one flag shared by several method configs, each with its
own default (``--generations``: evo 20, evop 100, darwinlm 10, width evo 5), and it must tell "not
given" (the method's default applies, and a recipe file may set it) from "given". Flags are therefore
generated with ``argparse.SUPPRESS`` defaults from :func:`evoprune.options.options_of`, in ~100 lines.
"""
from __future__ import annotations

import argparse
from typing import Iterable

from ..options import (
    Option,
    describe_default,
    options_of,
    parse_bool,
    parse_ints,
    parse_names,
    parse_stages,
)

__all__ = ["add_options", "add_search_options", "given", "flag_name", "BoolFlag", "UserHelpFormatter", "HelpAll",
           "mark_expert"]


def flag_name(name: str) -> str:
    """``drop_count`` -> ``--drop-count``."""
    return "--" + name.replace("_", "-")


class BoolFlag(argparse.Action):
    """``--flag`` (on), ``--flag on|off``, and the ``--no-flag`` twin registered beside it (off)."""

    def __init__(self, option_strings, dest, negate: bool = False, **kw):
        kw.setdefault("nargs", 0 if negate else "?")
        super().__init__(option_strings, dest, **kw)
        self.negate = negate

    def __call__(self, parser, namespace, values, option_string=None):
        if self.negate:
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is None else parse_bool(values))
        except ValueError as e:
            parser.error(f"{option_string}: {e}")


class UserHelpFormatter(argparse.HelpFormatter):
    """``--help`` that leaves out the actions marked ``expert`` (:func:`mark_expert`), in the usage line too."""

    def add_usage(self, usage, actions, groups, prefix=None):
        super().add_usage(usage, [a for a in actions if not getattr(a, "expert", False)], groups, prefix)

    def add_argument(self, action):
        if not getattr(action, "expert", False):
            super().add_argument(action)


class HelpAll(argparse.Action):
    """``--help-all``: the help with every option, the expert ones included, then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show every option, the expert knobs included (they also work in recipe files)")

    def __call__(self, parser, namespace, values, option_string=None):
        for a in parser._actions:
            a.expert = False
        parser.print_help()
        parser.exit()


def mark_expert(parser: argparse.ArgumentParser, shown: Iterable[str]) -> None:
    """Mark every option of ``parser`` whose dest is not in ``shown`` as expert: left out of ``--help``
    (:class:`UserHelpFormatter`), listed by ``--help-all``, parsed as always."""
    shown = set(shown)
    for a in parser._actions:
        a.expert = bool(a.option_strings) and a.dest not in shown and not isinstance(a, (argparse._HelpAction,
                                                                                        HelpAll))


def _type(o: Option):
    parse = {"ints": parse_ints, "stages": parse_stages, "names": parse_names, "int": int, "float": float,
             "str": str}.get(o.kind, str)

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = {"ints": "comma-separated integers", "stages": "'auto' or comma-separated integers", "names": "comma-separated names"}.get(o.kind, o.kind)
    return convert


def _add(group, o: Option, help_text: str, default=argparse.SUPPRESS, seen: set | None = None) -> None:
    names = [flag_name(n) for n in (o.flag, *o.aliases)]
    if seen is not None:
        if o.flag in seen:
            return
        seen.add(o.flag)
    if o.kind == "bool":
        group.add_argument(*names, dest=o.flag, action=BoolFlag, default=default, metavar="on|off", help=help_text)
        group.add_argument(flag_name("no_" + o.flag), dest=o.flag, action=BoolFlag, negate=True,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    metavar = {"ints": "N,N", "stages": "auto|N,N", "names": "NAME,NAME"}.get(o.kind)
    group.add_argument(*names, dest=o.flag, type=_type(o), default=default, choices=o.choices, metavar=metavar,
                       help=help_text)


def add_options(group, cls, *, exclude: Iterable[str] = (), required: Iterable[str] = (),
                defaults: bool = False) -> None:
    """Flags for the CLI options of config class ``cls`` (``exclude``: field names to leave out).

    ``defaults=False``: unset flags are absent from the namespace (the class's defaults apply when it is
    built); ``True``: argparse fills the class's defaults in. Help texts end with the default.
    """
    exclude, required = set(exclude), set(required)
    for o in options_of(cls):
        if not o.cli or o.field in exclude:
            continue
        if o.field in required:
            group.add_argument(flag_name(o.flag), dest=o.flag, type=_type(o), required=True, help=o.help)
            continue
        help_text = o.help if "default" in o.help else f"{o.help} (default: {describe_default(o.default)})"
        _add(group, o, help_text, default=o.default if defaults else argparse.SUPPRESS)


def add_search_options(p: argparse.ArgumentParser, *, sections: dict[str, type], methods: dict[tuple, type]) -> None:
    """Every flag of ``search``: the common ``sections`` (name -> class), then the space options and method
    options of every ``(space, method) -> strategy class``, one flag per option with its per-owner defaults."""
    seen: set = set()
    for name, cls in sections.items():
        add_options(p.add_argument_group(f"{name} options"), cls)
        seen.update(o.flag for o in options_of(cls))
    owners: dict[str, list] = {}  # flag -> [(owner label, resolved default, Option)]
    for (space, method), strategy in methods.items():
        hidden, resolved = set(strategy.inputs), strategy.config_cls()  # defaults as the method resolves them
        for o in options_of(strategy.config_cls):
            if o.cli and o.field not in hidden:
                label = method if space == "layers" else f"{space} {method}"
                owners.setdefault(o.flag, []).append((label, getattr(resolved, o.field), o))
    group = p.add_argument_group("method options (each applies to the methods named in its help)")
    for flag, owned in owners.items():
        o = owned[0][2]
        if any(x.kind != o.kind for _, _, x in owned):
            raise TypeError(f"--{flag} has different kinds in {', '.join(label for label, _, _ in owned)}")
        defaults = "; ".join(f"{label}: {describe_default(value)}" for label, value, _ in owned)
        _add(group, o, f"{o.help} ({defaults})", seen=seen)


def given(ns: argparse.Namespace, skip: Iterable[str] = ()) -> dict:
    """The flags present in ``ns`` (generated with SUPPRESS defaults: exactly those the user gave)."""
    skip = set(skip)
    return {k: v for k, v in vars(ns).items() if k not in skip and not k.startswith("_")}
