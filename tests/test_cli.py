"""CLI contract: JSON last line, and bad input -> one stderr line, exit 2, nothing written."""
from __future__ import annotations

import json
import os

import pytest

from transformers import GPT2Config


def run(*args, env=None):
    """``evoprune ARGS`` in this process (``main``), its exit code and what it printed."""
    import contextlib
    import io
    from types import SimpleNamespace

    from evoprune.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    os.environ.update({"EVOPRUNE_NO_PROGRESS": "1", **(env or {})})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _one_error_line(r, needle):
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("evoprune: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("info", "ppl", "export"):
        assert cmd in r.stdout


def test_info_and_ppl_json(tiny_dirs, text_file):
    d = str(tiny_dirs["llama"])
    info = json.loads(run("info", "--model", d).stdout.strip().splitlines()[-1])
    assert (info["layers"], info["heads"], info["kv_heads"], info["hidden"]) == (6, 4, 2, 64)
    r = run("ppl", "--model", d, "--dataset", f"text:{text_file}", "--seqlen", "32", "--max-windows", "3",
            "--drop", "1,4")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) >= {"model", "dataset", "ppl", "tokens", "dropped_layers"}
    assert out["dropped_layers"] == [1, 4] and out["tokens"] == 3 * 31 and out["ppl"] > 1


@pytest.mark.parametrize("args,needle", [
    (["info", "--model", "/no/such/model"], "not found"),
    (["ppl", "--model", "/no/such/dir/", "--dataset", "wikitext2"], "not found"),
    (["ppl", "--model", "{tiny}", "--dataset", "text:/no/such.txt"], "not found"),
    (["ppl", "--model", "{tiny}", "--dataset", "nosuchsource"], "unknown data source"),
    (["ppl", "--model", "{tiny}", "--dataset", "text:{text}", "--drop", "6", "--seqlen", "32"], "out of range"),
    (["ppl", "--model", "{tiny}", "--dataset", "text:{text}", "--drop", "2,2", "--seqlen", "32"], "repeated"),
    (["ppl", "--model", "{tiny}", "--dataset", "text:{text}", "--drop", "0,1,2,3,4,5", "--seqlen", "32"], "every layer"),
    (["ppl", "--model", "{tiny}", "--dataset", "text:{text}", "--seqlen", "100000"], "longer than the context"),
    (["ppl", "--model", "{tiny}", "--dataset", "text:{text}", "--drop", "a,b", "--seqlen", "32"], "integers"),
])
def test_bad_input_one_line_exit_2(tiny_dirs, text_file, args, needle):
    args = [a.format(tiny=tiny_dirs["llama"], text=text_file) for a in args]
    _one_error_line(run(*args), needle)


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0).save_pretrained(d)
    _one_error_line(run("info", "--model", str(d)), "unsupported architecture 'gpt2'")


def test_export_bad_input_writes_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    _one_error_line(run("export", "--model", str(tiny_dirs["opt"]), "--drop", "9", "--out", str(out)), "out of range")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _one_error_line(run("export", "--model", str(tiny_dirs["opt"]), "--drop", "1", "--out", str(out)), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_cli_round_trip(tiny_dirs, tmp_path):
    out = tmp_path / "exp"
    r = run("export", "--model", str(tiny_dirs["gemma3_text"]), "--drop", "0,5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["max_abs_diff"] <= 1e-5 and rec["n_layers"] == 4
    assert (out / "tokenizer.json").is_file() and (out / "pruning.json").is_file()


def test_demo_runs_the_leaderboards_default_beside_its_baseline(tiny_dirs, tmp_path, capsys):
    """The tour end to end on a tiny model: the demo space's default search and its one-shot baseline on one
    calibration set, held-out ppl of both on the same windows, the searched model exported and reload-checked."""
    from evoprune import cli
    from evoprune.cli.demo import BASELINES, SPACE

    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_dirs["llama"]), "--out", str(out), "--seqlen", "32", "--calib-seqlen", "32",
            "--nsamples", "2", "--max-windows", "1"]
    assert cli.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    d = json.loads((out / "demo.json").read_text())
    base = BASELINES[SPACE][0]
    assert last["space"] == d["space"] == SPACE and d["search"]["space"] == d["baseline"]["space"] == SPACE
    assert d["baseline"]["method"] == base and d["baseline"]["evaluations"] == 1 and d["search"]["evaluations"] > 1
    assert d["search"]["calib"] == d["baseline"]["calib"]  # one calibration set
    for ds in ("wikitext2", "c4"):
        got = d["ppl"][ds]
        assert got["evo"]["tokens"] == got[base]["tokens"] == got["dense"]["tokens"] > 0
        assert last[f"{ds}_ppl"]["evo"] == round(got["evo"]["ppl"], 2)
    assert d["export"]["max_abs_diff"] < 1e-4 and (out / "model" / "config.json").exists()
