"""The docs stay true: the command reference is the parser's (regenerate with ``python -m evoprune.cli.docs``), the
README stays a front door whose links resolve, and no code or README line explains itself by an issue number."""
from __future__ import annotations

import re
from pathlib import Path

from evoprune.cli import build_parser
from evoprune.cli.docs import BEGIN, END, command_reference

ROOT = Path(__file__).resolve().parents[1]
README, CLI = ROOT / "README.md", ROOT / "docs" / "cli.md"


def test_command_reference_is_current():
    text = CLI.read_text(encoding="utf-8")
    block = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    assert block, "docs/cli.md has no generated command reference"
    assert block.group(1) == command_reference(build_parser()), "stale: run python -m evoprune.cli.docs"


def test_reference_shows_the_defaults_that_apply():
    ref = command_reference(build_parser())
    assert "evo: 20; evop: 100" in ref and "levels darwinlm: 8" in ref  # per-method defaults of --generations, --offspring
    assert "(default evo)" in ref and "(default darwinlm)" in ref


def test_readme_is_a_front_door_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    docs = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_no_issue_numbers_in_code_or_readme():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in [README, *sorted((ROOT / "src").rglob("*.py"))]
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"\bissue [0-9]", line, re.I)]
    assert hits == []


def test_search_help_shows_what_a_user_sets_and_help_all_the_rest(capsys):
    from evoprune.cli import main

    for flag, most in (("--help", 40), ("--help-all", None)):
        assert main(["search", flag]) == 0
        shown = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("  -")]
        if most:
            assert len(shown) <= most and "--race-margin" not in shown and "--sparsity" in shown
        else:
            assert "--race-margin," not in shown and "--race-margin" in shown and len(shown) > 90
    ns = build_parser().parse_args(["search", "--race-margin", "0.1", "--out", "x"])  # an expert flag still parses
    assert ns.race_margin == 0.1
