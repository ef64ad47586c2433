"""Tables and number formats of reports: markdown tables, terminal tables (rich), and cell formats.

Owns :func:`md_table` (the one markdown table formatter: reports and the benchmark scripts' RESULTS
sections), :func:`text_table` (the one terminal table formatter: ``demo``, ``bench``, ``eval``, ``info``;
rendered by rich) and the cell formats :func:`fmt`, :func:`fmt_wall`, :func:`fmt_layers`.
"""
from __future__ import annotations

import math

__all__ = ["md_table", "text_table", "fmt", "fmt_wall", "fmt_layers", "finite", "scored"]


def finite(x) -> bool:
    """A real, finite number (not a bool-like string, not NaN/inf)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def scored(row: dict) -> bool:
    """A history row with a complete, finite score (a raced row's loss is partial: not comparable)."""
    return finite(row.get("loss")) and not row.get("raced")


def fmt_wall(s) -> str:
    if not finite(s):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {s % 60:.0f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def fmt(x, spec: str) -> str:
    return format(x, spec) if finite(x) else "-"


def fmt_layers(xs) -> str:
    return ", ".join(str(i) for i in xs) if xs else "-"


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list], *, title: str | None = None, footer: list[str] = (),
               right: tuple[int, ...] | None = None) -> str:
    """A plain terminal table (rich's ``Table``: columns apart by spaces, a dashed rule under the header; no
    colour, ASCII only) as a string.

    ``right``: indices of right-aligned columns (default: every column but the first); ``footer``: lines
    printed under the table.
    """
    import io

    from rich.box import Box
    from rich.console import Console
    from rich.table import Table

    plain = Box("    \n    \n -- \n    \n    \n -- \n    \n    \n", ascii=True)  # rich's SIMPLE, in ASCII
    right = tuple(range(1, len(head))) if right is None else right
    table = Table(box=plain, show_edge=False, show_header=any(head), title=title, title_justify="left", pad_edge=False)
    for i, h in enumerate(head):
        table.add_column(str(h), justify="right" if i in right else "left", no_wrap=True)
    for r in rows:
        table.add_row(*[str(c) for c in r])
    buf = io.StringIO()
    Console(file=buf, width=10_000, color_system=None, force_terminal=False, soft_wrap=True).print(table)
    lines = [ln.rstrip() for ln in buf.getvalue().splitlines()]
    return "\n".join([*lines, *footer])
