"""The README's command reference is the parser's (regenerate with ``python -m evoprune.cli.docs``)."""
from __future__ import annotations

import re
from pathlib import Path

from evoprune.cli import build_parser
from evoprune.cli.docs import BEGIN, END, command_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_command_reference_is_current():
    text = README.read_text(encoding="utf-8")
    block = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    assert block, "README.md has no generated command reference"
    assert block.group(1) == command_reference(build_parser()), "stale: run python -m evoprune.cli.docs"


def test_reference_shows_the_defaults_that_apply():
    ref = command_reference(build_parser())
    assert "evo: 20; evop: 100" in ref and "levels darwinlm: 8" in ref  # per-method defaults of --generations, --offspring
    assert "(default evo)" in ref and "(default darwinlm)" in ref
