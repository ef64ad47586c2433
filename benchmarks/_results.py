"""Write one named section of docs/RESULTS.md (between BEGIN/END markers), leaving the rest as it is.

Tables come from :func:`evoprune.report.tables.md_table` (re-exported here), the one markdown table formatter.
"""
from __future__ import annotations

import platform
import re
import sys
from datetime import date
from pathlib import Path

from evoprune.report.tables import md_table  # noqa: F401  (re-exported)

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


def machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        cpu = platform.processor() or "unknown CPU"
    import os

    import torch

    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, CPU only"


def command() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])


def write_section(name: str, body: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else "# evoprune results\n"
    head = f"<!-- BEGIN {name} -->"
    tail = f"<!-- END {name} -->"
    stamp = f"_Command:_ `{command()}`  \n_Machine:_ {machine()}  \n_Date:_ {date.today().isoformat()}\n\n"
    block = f"{head}\n{stamp}{body.strip()}\n{tail}"
    pat = re.compile(re.escape(head) + r".*?" + re.escape(tail), re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def floats(s: str) -> list[float]:
    """``"0.2,0.3"`` -> ``[0.2, 0.3]`` (a comma-separated command-line list)."""
    return [float(x) for x in s.split(",") if x]
