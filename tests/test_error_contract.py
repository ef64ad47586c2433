"""The error contract, whole by construction: every option of every subcommand that takes a value, given a bad
value, is one ``evoprune: error:`` line naming it, exit 2, and nothing written.

The table :data:`BAD` holds the bad values of each option (negative, zero, NaN, out of range, a missing file, a
file where a directory is expected, an unknown name, an empty string). :func:`test_table_covers_every_option`
walks the parser: an option added without a row here fails it. Each case runs the CLI in-process on a tiny
model, in an empty working directory; a case also asserts that no model weights were loaded, except the few
values only the model can refuse (:data:`NEEDS_MODEL`).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from evoprune import cli

# ------------------------------------------------------------------------------------------------------------------
# the table

NEG, ZERO, NAN, INF, WORD, EMPTY = "-1", "0", "nan", "inf", "abc", ""
MISSING, FILE, DIR = "{tmp}/no/such", "{file}", "{tmp}"
TOO_LONG = "100000"  # positions: more than any model's context here (tiny models: 256, SmolLM2: 8192)


def _cuda_bad() -> list[str]:
    import torch

    return [f"cuda:{torch.cuda.device_count()}"] if torch.cuda.is_available() else ["cuda", "cuda:7"]


DEVICE = [EMPTY, "nosuch", "meta", *_cuda_bad()]
POSITIVE_INT = [ZERO, NEG, WORD]
POSITIVE_FLOAT = [ZERO, NEG, NAN, INF, WORD]
FRACTION_OPEN = [ZERO, "1", NAN, NEG]          # (0, 1)
FRACTION_CLOSED = [NEG, "1.5", NAN, WORD]      # [0, 1]
NONNEG_INT = [NEG, WORD, "1.5"]
NONNEG_FLOAT = [NEG, NAN, INF, WORD]
BOOL = ["maybe"]
CHOICE = ["nosuch"]
NAME = [EMPTY]

# option -> bad values, for every command that has it; (command, option) rows override
BAD: dict = {
    # model and data
    "--model": [EMPTY, MISSING, FILE], "--device": DEVICE, "--dtype": CHOICE,
    "--dataset": [EMPTY, "nosuch", "text:{tmp}/no/such.txt", "text:{tmp}"],
    "--drop": ["a,b", "1,1", NEG], "--seqlen": [NEG, "1", TOO_LONG], "--max-windows": POSITIVE_INT,
    "--batch-size": POSITIVE_INT, "--out": [EMPTY, FILE], "--overwrite": [],
    # search: top level, calibration, budget, fitness
    "--space": [EMPTY, "nosuch"], "--method": [EMPTY, "nosuch"], "--seed": [NEG, WORD],
    "--config": [EMPTY, MISSING, DIR], "--budget-from": [EMPTY, MISSING, FILE],
    "--calib": [EMPTY, "nosuch", "text:{tmp}/no/such.txt", "jsonl:{tmp}"], "--sampling": CHOICE,
    "--nsamples": POSITIVE_INT, "--clusters": POSITIVE_INT, "--samples-per-cluster": POSITIVE_INT,
    "--chunk-sentences": POSITIVE_INT, "--embedder": [EMPTY, "./no/such", FILE],
    "--calib-from": [EMPTY, MISSING, FILE],
    "--sparsity": FRACTION_OPEN, "--drop-count": [ZERO, NEG, "6"], "--budget-token-layers": POSITIVE_INT,
    "--fitness": CHOICE, "--kl-topk": [ZERO, NEG], "--cache-mb": [NEG, NAN, WORD], "--cache-every": [ZERO, NEG, WORD],
    # space options
    "--protect-ends": BOOL, "--importance": CHOICE, "--min-rate": FRACTION_CLOSED, "--max-rate": [ZERO, "1.5", NAN],
    "--owl-m": [ZERO, NEG, NAN, INF], "--reconstruct": CHOICE, "--start-from": CHOICE, "--database": CHOICE,
    "--levels-db": [EMPTY, FILE],
    "--attn-levels": [ZERO, NEG], "--mlp-levels": [ZERO, NEG], "--obs-damp": [NEG, "1", NAN],
    "--separate-budgets": BOOL,
    # LLM operator
    "--operator-url": [EMPTY, "not a url", "ftp://host/v1"], "--operator-model": NAME,
    "--operator-api-key-env": [EMPTY, "1BAD NAME"], "--operator-timeout-s": POSITIVE_FLOAT,
    "--operator-retries": NONNEG_INT, "--operator-backoff-s": NONNEG_FLOAT, "--operator-call-budget": NONNEG_INT,
    "--operator-temperature": [NEG, NAN, "5"], "--operator-max-tokens": POSITIVE_INT,
    "--operator-tol": [NEG, NAN, "2"], "--operator-repair-tol": [NEG, NAN, "2"], "--operator-dataset": NAME,
    "--operator-structured": CHOICE, "--operator-project": BOOL,
    # brief training
    "--train-mode": CHOICE, "--train-lr": POSITIVE_FLOAT, "--train-rank": POSITIVE_INT,
    "--train-batch-size": POSITIVE_INT, "--training-aware": BOOL, "--train-tokens-per-stage": [ZERO, WORD, "1,2,3"],
    "--train-data": [EMPTY, "nosuch", "alpaca:{tmp}/no/such.json"],
    # execution
    "--workers": [ZERO, NEG, "1.5"], "--ray-address": [EMPTY, "nosuch"], "--gpus-per-worker": [ZERO, NEG, NAN],
    "--device-map": [EMPTY, "nosuch"], "--hessian-mb": [ZERO, NEG, NAN, INF], "--cache-device": [EMPTY, "nosuch"],
    "--report-to": [EMPTY, "nosuch", "none,wandb"],
    # method options
    "--generations": POSITIVE_INT, "--offspring": POSITIVE_INT, "--survivors-per-stage": [ZERO, WORD, "3,2,1"],
    "--tokens-per-stage": [ZERO, WORD, "1,2,3"], "--elitism": BOOL, "--race-margin": [NEG, NAN, INF],
    "--seed-fraction": FRACTION_CLOSED, "--adjacent": FRACTION_CLOSED, "--budget-share": [NEG, NAN, INF],
    "--greedy-seed": BOOL, "--greedy-promote": NONNEG_INT, "--greedy-screen": [ZERO, "1.5", NAN],
    "--population": [ZERO, "1", NEG], "--mutation-rate": FRACTION_CLOSED, "--elite-fraction": FRACTION_CLOSED,
    "--crossover": CHOICE, "--force": BOOL, "--budget": POSITIVE_INT, "--mutations": NONNEG_INT,
    "--crossovers": NONNEG_INT, "--step": [ZERO, NEG, NAN], "--owl-lambda": [NEG, NAN, "1"], "--promote": POSITIVE_INT,
    "--probe": [NEG, NAN, "1.5"], "--probe-rounds": POSITIVE_INT, "--probe-gain": [NEG, NAN, INF],
    "--llm-init": BOOL, "--llm-mutation": BOOL, "--llm-crossover": BOOL, "--max-flips": POSITIVE_INT,
    "--budget-evals": [NEG, NAN, INF],
    # plan
    "--model-config": [EMPTY, MISSING], "--tflops": POSITIVE_FLOAT, "--gpus": POSITIVE_INT,
    "--gpu-memory": POSITIVE_FLOAT, "--mfu": [ZERO, "1.5", NAN],
    # demo, eval, bench
    "--calib-seqlen": [NEG, "1", TOO_LONG], "--baseline": [],
    "--tasks": [EMPTY, "nosuch"], "--limit": POSITIVE_INT, "--num-fewshot": [NEG, WORD], "--stock-tasks": [],
    "--base": [EMPTY, MISSING], "--batch": POSITIVE_INT, "--decode-tokens": [ZERO, NEG, TOO_LONG],
    "--prompt-tokens": [ZERO, NEG, TOO_LONG], "--repeats": POSITIVE_INT,
    # report, compare
    "--ppl-json": [EMPTY, MISSING, DIR, FILE],
    # finetune
    "--data": [EMPTY, "nosuch", "text:{tmp}/no/such.txt", "alpaca:{tmp}"], "--steps": POSITIVE_INT,
    "--rank": POSITIVE_INT, "--alpha": [ZERO, NEG, NAN], "--dropout": [NEG, "1", NAN], "--lr": POSITIVE_FLOAT,
    "--warmup-steps": [NEG, "5"], "--schedule": CHOICE, "--weight-decay": [NEG, NAN, INF],
    "--max-grad-norm": [ZERO, NEG, NAN], "--target": [EMPTY, "nosuch_proj"], "--loss": CHOICE,
    "--kd-topk": [ZERO, NEG, WORD], "--mode": CHOICE, "--teacher": [EMPTY, MISSING],
    # operator-server
    "--backend": CHOICE, "--host": [EMPTY, "256.1.1.1", "no.such.host.invalid"], "--port": [NEG, "99999", WORD],
    "--threads": [ZERO, NEG],
    # export --format gguf, bench --engine llama.cpp
    "--format": CHOICE, "--outtype": CHOICE, "--check-data": [EMPTY, "nosuch"], "--engine": CHOICE,
    # positionals
    "run": [EMPTY, MISSING, FILE, DIR], "runs": [MISSING, FILE, DIR],
}
BAD |= {
    ("eval", "--out"): [EMPTY, DIR, "{file}/x.json"], ("bench", "--out"): [EMPTY, DIR, "{file}/x.json"],
    ("eval", "model"): [EMPTY, MISSING, FILE], ("bench", "model"): [EMPTY, MISSING, FILE],
    ("finetune", "model"): [EMPTY, MISSING, FILE], ("export", "run"): [EMPTY, MISSING, FILE],
    ("finetune", "--seed"): [NEG, WORD], ("report", "--out"): [EMPTY, "{file}/x"], ("compare", "--out"): [EMPTY, FILE],
    ("bench", "--seqlen"): [ZERO, NEG, TOO_LONG], ("finetune", "--seqlen"): [NEG, "1", TOO_LONG],
    ("finetune", "--batch-size"): POSITIVE_INT, ("operator-server", "--model"): [EMPTY, MISSING, FILE],
    ("finetune", "--kd-topk"): [ZERO, NEG, WORD], ("finetune", "--teacher"): [EMPTY, MISSING],
    # plan predicts for another machine: a device or file it does not have here is not an error, a bad name is
    ("plan", "--device"): [EMPTY, "nosuch"], ("plan", "--cache-device"): [EMPTY, "nosuch"],
    ("plan", "--calib"): [EMPTY, "nosuch"], ("plan", "--calib-from"): [EMPTY], ("plan", "--embedder"): [EMPTY],
    ("plan", "--train-data"): [EMPTY, "nosuch"], ("plan", "--model"): [EMPTY],
    ("plan", "--drop-count"): [ZERO, NEG, "30"],  # the plan's model: SmolLM2's shipped config, 30 blocks
}
# values only the loaded model refuses: the search's space is built from the model (its blocks, protected ends);
# everything else is refused before any weights load
NEEDS_MODEL = {("search", "--drop-count", "6")}

# ------------------------------------------------------------------------------------------------------------------
# the commands: a valid, fast command line each, that a bad value is put into


def _search_owner(flag: str) -> tuple[str, str] | None:
    """The first (space, method) of which ``flag`` is an option (space or method options)."""
    from evoprune.options import options_of
    from evoprune.runner.config import section_classes
    from evoprune.search import SPACE_KINDS, get_strategy, methods

    dest = flag[2:].replace("-", "_")
    for space in SPACE_KINDS:
        for m in methods(space):
            secs = section_classes(space, m)
            hidden = get_strategy(m, space).inputs
            for name in ("space_options", "method_options", "operator", "training"):
                cls = secs.get(name)
                if cls is not None and any(o.cli and o.flag == dest and not (name == "method_options" and o.field in
                                                                               hidden) for o in options_of(cls)):
                    return space, m
    return None


_COMMON_SECTIONS = {"model", "calibration", "budget", "fitness", "execution"}


def _search_base(flag: str, command: str) -> list[str]:
    from evoprune.search import get_strategy

    owner = _search_owner(flag)
    space, method = owner if owner else ("layers", "evop")
    args = ["--model", "{tiny}", "--calib", "text:{text}", "--sampling", "random", "--nsamples", "2", "--seqlen",
            "32", "--space", space, "--method", method]
    if flag != "--sparsity":
        args += ["--drop-count", "2"] if space == "layers" else ["--sparsity", "0.3"]
    if "operator" in get_strategy(method, space).needs:
        args += ["--operator-url", "http://127.0.0.1:9/v1", "--operator-model", "m"]
    if flag in ("--embedder", "--clusters", "--samples-per-cluster", "--chunk-sentences"):
        args = [a for a in args if a not in ("--sampling", "random")] + ["--sampling", "ccds"]
    if flag == "--kl-topk":
        args += ["--fitness", "kl"]
    if command == "plan":
        args = [a if a != "{tiny}" else "smollm2-135m" for a in args]
        args = [a for i, a in enumerate(args) if not (a == "--seqlen" or args[i - 1] == "--seqlen")]
        return ["plan", *args]
    return ["search", *args, "--out", "{tmp}/run"]


BASES = {
    "info": ["info", "--model", "{tiny}"],
    "ppl": ["ppl", "--model", "{tiny}", "--dataset", "text:{text}", "--seqlen", "32"],
    "export": ["export", "--model", "{tiny}", "--drop", "1", "--out", "{tmp}/exp"],
    "resume": ["resume", "{run}"],
    "demo": ["demo", "--model", "{tiny}", "--out", "{tmp}/demo", "--seqlen", "32", "--calib-seqlen", "32"],
    "eval": ["eval", "{tiny}", "--tasks", "arc_easy", "--limit", "2"],
    "bench": ["bench", "{tiny}", "--drop", "1", "--seqlen", "32"],
    "report": ["report", "{run}"],
    "compare": ["compare", "{run}", "--out", "{tmp}/cmp"],
    "finetune": ["finetune", "{tiny}", "--data", "text:{text}", "--steps", "1", "--seqlen", "32", "--out",
                 "{tmp}/ft"],
    "operator-server": ["operator-server"],
}


def _options() -> list[tuple[str, str]]:
    """Every (command, option) of the parser that takes a value (positionals named by their dest)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS or a.nargs == 0:
                continue
            out.append((name, a.option_strings[0] if a.option_strings else a.dest))
    return out


def _bad(command: str, option: str) -> list[str] | None:
    return BAD.get((command, option), BAD.get(option))


def _cases():
    return [pytest.param(c, o, v, id=f"{c} {o}={v!r}") for c, o in _options() for v in (_bad(c, o) or [])]


def test_table_covers_every_option():
    missing = [f"{c} {o}" for c, o in _options() if _bad(c, o) is None]
    assert not missing, f"options without bad values in BAD: {missing}"
    assert len(_options()) > 250
    empty = [f"{c} {o}" for c, o in _options() if _bad(c, o) == []]
    assert not empty, f"options that take a value must have a bad one: {empty}"


def _argv(command: str, option: str, value: str) -> list[str]:
    base = _search_base(option, command) if command in ("search", "plan") else list(BASES[command])
    if command == "finetune" and option in ("--teacher", "--kd-topk"):  # options of distillation
        base += ["--loss", "kd", "--drop", "1"]
    if option in ("run", "model", "runs") and not base[1].startswith("-"):  # positional: replace it
        return [base[0], value, *base[2:]]
    if option in ("run", "runs"):
        return [base[0], value, *base[1:]]
    if option in base:
        i = base.index(option)
        return [*base[:i], option, value, *base[i + 2:]]
    if option == "--drop" and command == "bench":
        return [*base, "--drop", value]
    return [*base, option, value]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dirs):
    """A tiny model, a text file, a finished run to resume / report, a plain file."""
    root = tmp_path_factory.mktemp("contract")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    run = root / "run"
    assert cli.main(["search", "--model", str(tiny_dirs["llama"]), "--method", "evop", "--drop-count", "2", "--calib",
                     f"text:{text}", "--sampling", "random", "--nsamples", "2", "--seqlen", "32", "--population", "4",
                     "--generations", "1", "--out", str(run)]) == 0
    plain = root / "plain.txt"
    plain.write_text("not a model, not a run\n")
    return {"tiny": str(tiny_dirs["llama"]), "text": str(text), "run": str(run), "file": str(plain)}


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _mentions(line: str, option: str, value: str) -> bool:
    """Whether the error line is about ``option``: its flag or field name, or the bad value itself."""
    name = option.lstrip("-")
    names = {option, name, name.replace("-", "_"), name.replace("-", " ")}
    return any(n and n in line for n in names) or (len(value) > 3 and value in line)


@pytest.mark.parametrize("command,option,value", _cases())
def test_bad_value_one_line_exit_2_nothing_written(world, tmp_path, monkeypatch, capsys, command, option, value):
    import transformers

    import evoprune.models.loading as loading
    import evoprune.search.llm.server as server

    loaded = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def counted(*a, **k):
        loaded.append(a[:1])
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
    monkeypatch.setattr(loading, "_gguf_to_cache", lambda *a, **k: pytest.fail("de-quantized a model"))
    monkeypatch.setattr(server, "_serve", lambda *a, **k: pytest.fail("started a server"))
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    fill = {**world, "tmp": str(work)}
    argv = [a.format(**fill) for a in _argv(command, option, value.format(**fill))]
    watched = [work, Path(world["run"])]
    before = [_tree(w) for w in watched]
    capsys.readouterr()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    shown = " ".join(a.replace(str(work), "CWD").replace(str(Path(world["run"]).parent), "W") for a in argv)
    assert rc == 2, f"{shown} -> rc {rc}: {err[-300:]}"
    assert len(lines) == 1 and lines[0].startswith("evoprune: error:") and "Traceback" not in err, \
        f"{shown} -> {err[-500:]}"
    assert _mentions(lines[0], option, value.format(**fill)), f"{shown} -> not about {option}: {lines[0]}"
    assert [_tree(w) for w in watched] == before, f"{argv} wrote something"
    if (command, option, value) not in NEEDS_MODEL:
        assert not loaded, f"{argv}: refused only after loading the model"


# ------------------------------------------------------------------------------------------------------------------
# the cases the table stands for, as a user meets them


@pytest.fixture
def no_weights(monkeypatch):
    """Fail if any model weights are read or a server starts."""
    import transformers

    import evoprune.models.loading as loading
    import evoprune.search.llm.server as server

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded model weights"))
    monkeypatch.setattr(loading, "_gguf_to_cache", lambda *a, **k: pytest.fail("de-quantized a model"))
    monkeypatch.setattr(server, "_serve", lambda *a, **k: pytest.fail("started a server"))


def _one_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("evoprune: error:"), (rc, err)
    return err[0]


def test_cuda_on_a_machine_without_it(world, no_weights, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _one_line(capsys, ["ppl", "--model", world["tiny"], "--device", "cuda", "--seqlen", "32"])
    assert "--device cuda: " in line and ("CPU-only build" in line or "no CUDA device" in line)
    line = _one_line(capsys, ["bench", world["tiny"], "--drop", "1", "--device", "cuda:7", "--seqlen", "32"])
    assert "--device cuda:7" in line


def test_window_longer_than_smollm2_context(no_weights, capsys):
    """The bundled SmolLM2 (8,192 positions, read from its GGUF or its converted config) refuses longer windows."""
    line = _one_line(capsys, ["ppl", "--model", "smollm2-135m", "--seqlen", "100000"])
    assert line == "evoprune: error: --seqlen 100000 is longer than the context of smollm2-135m (8,192 positions)"


def test_operator_server_address_checked_before_loading(no_weights, capsys):
    import socket

    assert "--port must be an integer in 0..65535" in _one_line(capsys, ["operator-server", "--port", "99999"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_line(capsys, ["operator-server", "--port", port])
    assert line == f"evoprune: error: cannot listen on 127.0.0.1:{port}: the port is in use"


def test_failed_server_is_one_line_naming_its_log(tmp_path):
    """llama.cpp's server exiting at start (here: a .gguf that is none) is summed up in one line with its log."""
    pytest.importorskip("llama_cpp")
    from evoprune.errors import UserError
    from evoprune.search.llm.server import start_llama_cpp_server

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError) as e:
        with start_llama_cpp_server(bad, startup_timeout_s=120):
            pass
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("llama.cpp server exited with code")
    log = Path(msg.rsplit("(full log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text()
    log.unlink()
