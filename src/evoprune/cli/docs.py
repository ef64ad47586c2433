"""The command reference (``docs/cli.md``), generated from the parser (so it cannot drift from the defaults).

Owns :func:`command_reference` (markdown: one section per command, one table per option group) and
:func:`update_reference`. ``python -m evoprune.cli.docs`` rewrites the block between the
``<!-- BEGIN command-reference -->`` / ``<!-- END command-reference -->`` markers of ``docs/cli.md``;
``tests/test_docs.py`` fails when that block differs from what the parser says.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["command_reference", "update_reference", "BEGIN", "END"]

BEGIN, END = "<!-- BEGIN command-reference -->", "<!-- END command-reference -->"


def _flag(action: argparse.Action) -> str:
    from .options import BoolFlag

    names = " / ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest.upper()}`"
    if isinstance(action, BoolFlag):
        return names + f" [on\\|off] / `--no-{action.option_strings[0][2:]}`"
    if action.nargs == 0:
        return names
    metavar = action.metavar or (action.dest.upper() if action.option_strings else None)
    if action.choices and not action.metavar:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    return names + (f" {metavar}" if metavar and action.option_strings else "")


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
    if action.required and action.option_strings:
        text = "(required) " + text
    if getattr(action, "expert", False):
        text = "*(expert: `--help-all`, recipe files)* " + text
    return re.sub(r"\s+", " ", text).strip()


def command_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown tables of every command's options, in the parser's order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = []
    for name, p in sub.choices.items():
        out += [f"#### `evoprune {name}`", "", helps.get(name, ""), ""]
        for group in p._action_groups:
            rows = [a for a in group._group_actions
                    if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS]
            if not rows:
                continue
            title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
            out += [f"{title}:", "", "| option | meaning |", "|---|---|"]
            out += [f"| {_flag(a)} | {_help(a)} |" for a in rows]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_reference(readme: Path) -> bool:
    """Rewrite the command-reference block of the markdown file ``readme``; returns whether it changed."""
    from . import build_parser

    text = readme.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{command_reference(build_parser())}{END}"
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    new = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # pragma: no cover
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "docs" / "cli.md"
    print(f"{target}: {'updated' if update_reference(target) else 'already up to date'}")
