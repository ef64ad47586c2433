"""GGUF export (``evoprune export --format gguf``): every space's result written for llama.cpp and checked by it.

The tiny models of every family llama.cpp can run (llama, mistral, qwen2, qwen3) export with whole blocks removed;
tiny llama with per-layer widths, attention-free and MLP-free blocks exports as ``deci``; the real SmolLM2 results
of each space (layers, sub-layers, width, levels) export to f32 and q8_0 and llama.cpp's perplexity on held-out
tokens equals evoprune's within the stated tolerance. Structures llama.cpp cannot express, unknown types and
existing outputs are refused with one line, nothing written.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp")

from evoprune import load_model  # noqa: E402
from evoprune.errors import UserError  # noqa: E402
from evoprune.export.checked import ExportError  # noqa: E402
from evoprune.export.gguf import export_gguf  # noqa: E402
from evoprune.models.loading import gguf_file  # noqa: E402
from evoprune.runner.pruned import apply_sublayers_inplace  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _export(lm, out, text, outtype="f32", seqlen=64, **kw):
    return export_gguf(lm, out, outtype=outtype, dataset=f"text:{text}", check_seqlen=seqlen, threads=1, **kw)


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                         ("qwen3", "qwen3")])
def test_tiny_families_export_blocks_removed(tiny_dirs, text_file, tmp_path, family, arch):
    lm = load_model(str(tiny_dirs[family]), progress=False)
    lm.dropped = tuple(lm.adapter.drop_inplace(lm.model, [1, 4]).dropped)
    rec = _export(lm, tmp_path / "g", text_file)
    assert rec["architecture"] == arch and rec["n_layers"] == 4 and rec["dropped_layers"] == [1, 4]
    # a random tiny model: ppl near the vocabulary size; llama.cpp agrees to float rounding
    assert 100 < rec["evoprune_ppl"] < 2000
    assert abs(rec["ppl_ratio"] - 1) < 1e-4 and rec["mean_abs_dlogit"] < 1e-3 * rec["logit_std"]
    files = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert files == ["Modelfile", "model-f32.gguf", "pruning.json"]
    assert json.loads((tmp_path / "g" / "pruning.json").read_text())["file"] == "model-f32.gguf"


def _plan(model, groups, channels):
    """A :class:`WidthPlan` keeping ``groups[i]`` / ``channels[i]`` of block ``i``."""
    from evoprune.models.slicing import width_spec
    from evoprune.prune.width_plan import WidthPlan

    spec = width_spec(model)
    kept = [len(g) * lw.group_params + len(c) * lw.channel_params + lw.fixed_params
            for g, c, lw in zip(groups, channels, spec.layers)]
    rates = tuple(1 - k / lw.total for k, lw in zip(kept, spec.layers))
    return WidthPlan(rates, tuple(map(tuple, groups)), tuple(map(tuple, channels)), rates, sum(kept), spec.total)


def _width_llama(tiny_dirs):
    """Tiny llama with per-layer widths: block 0 keeps 1 of 2 groups and 40 channels, block 2 full, ..."""
    from evoprune.models.slicing import apply_width_inplace

    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    groups = [(0,), (0, 1), (1,), (0, 1), (0,), (0, 1)]
    channels = [tuple(range(40)), tuple(range(96)), tuple(range(0, 96, 3)), tuple(range(50)), tuple(range(96)),
                tuple(range(7))]
    apply_width_inplace(lm.model, _plan(lm.model, groups, channels))
    return lm


def test_width_exports_as_deci_f32_and_q8_0(tiny_dirs, text_file, tmp_path):
    lm = _width_llama(tiny_dirs)
    rec = _export(lm, tmp_path / "f32", text_file)
    assert rec["architecture"] == "deci" and rec["n_layers"] == 6
    assert [(s["heads"], s["kv_heads"], s["ff"]) for s in rec["layers"]] == [
        (2, 1, 40), (4, 2, 96), (2, 1, 32), (4, 2, 50), (2, 1, 96), (4, 2, 7)]
    assert abs(rec["ppl_ratio"] - 1) < 1e-4 and rec["mlp_padded_layers"] == []
    q = _export(lm, tmp_path / "q8", text_file, outtype="q8_0")
    # q8_0 rows must be multiples of 32: the MLPs of 40, 50 and 7 channels get zero channels
    assert [s["ff"] for s in q["layers"]] == [64, 96, 32, 64, 96, 32] and q["mlp_padded_layers"] == [0, 3, 5]
    assert q["params"] == rec["params"] < q["gguf_params"]
    assert abs(q["ppl_ratio"] - 1) < 0.02


def test_sublayers_attention_free_first_and_mlp_free_blocks(tiny_dirs, text_file, tmp_path):
    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    apply_sublayers_inplace(lm, attention=[0, 3, 5], mlp=[2, 5])  # block 5 goes whole
    rec = _export(lm, tmp_path / "g", text_file)
    assert rec["architecture"] == "deci" and rec["n_layers"] == 5
    # llama.cpp reads the head size from layer 0: an attention-free first block gets one zero group;
    # an MLP-free block one zero channel (its empty MLP with attention is computed wrongly by llama.cpp)
    assert rec["attention_padded_layers"] == [0] and rec["mlp_padded_layers"] == [2]
    assert [(s["heads"], s["ff"]) for s in rec["layers"]] == [(2, 96), (4, 96), (4, 1), (0, 96), (4, 96)]
    assert abs(rec["ppl_ratio"] - 1) < 1e-4


def test_levels_result_exports(tiny_dirs, calib_text, text_file, tmp_path, monkeypatch):
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = SearchConfig.build(model=str(tiny_dirs["llama"]), calib=f"text:{calib_text}", sampling="random",
                             nsamples=2, seqlen=32, space="levels", method="uniform", sparsity=0.3)
    run_search(cfg, tmp_path / "run", progress=False)
    lm = load_model(str(tmp_path / "run"), progress=False)
    rec = _export(lm, tmp_path / "g", text_file, extra={"run": "levels"})
    assert rec["architecture"] in ("deci", "llama") and abs(rec["ppl_ratio"] - 1) < 1e-4


@pytest.mark.parametrize("family", ["gemma3_text", "opt"])
def test_families_llama_cpp_cannot_run_are_refused(tiny_dirs, text_file, tmp_path, family):
    lm = load_model(str(tiny_dirs[family]), progress=False)
    with pytest.raises(UserError, match="--format gguf: llama.cpp has no architecture"):
        _export(lm, tmp_path / "g", text_file)
    assert not (tmp_path / "g").exists()


def test_qwen_widths_are_refused_naming_the_block(tiny_dirs, text_file, tmp_path):
    lm = load_model(str(tiny_dirs["qwen3"]), progress=False)
    apply_sublayers_inplace(lm, attention=[2], mlp=[])
    with pytest.raises(UserError, match="block 2 has 0 query heads"):
        _export(lm, tmp_path / "g", text_file)
    assert not (tmp_path / "g").exists()


def test_a_failed_check_leaves_nothing(tiny_dirs, text_file, tmp_path, monkeypatch):
    import evoprune.export.gguf as g

    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    monkeypatch.setitem(g.TOLERANCES, "f32", (0.0, 0.0, 1.0 - 1e-9))
    with pytest.raises(ExportError, match="GGUF check failed"):
        _export(lm, tmp_path / "g", text_file)
    assert [p.name for p in tmp_path.iterdir()] == ["text.txt"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "evoprune.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_input_one_line_nothing_written(tiny_dirs, text_file, tmp_path):
    base = ["export", "--model", str(tiny_dirs["llama"]), "--format", "gguf", "--check-data", f"text:{text_file}"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    for extra, needle in ((["--outtype", "q3"], "--outtype"), (["--out", str(tmp_path / "full")], "not empty"),
                          (["--format", "onnx"], "--format")):
        args = base + (["--out", str(tmp_path / "new")] if "--out" not in extra else []) + extra
        r = _cli(*args)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "text.txt"]
    r = _cli("export", "--model", str(tiny_dirs["opt"]), "--format", "gguf", "--check-data", f"text:{text_file}",
             "--out", str(tmp_path / "opt"))
    assert r.returncode == 2 and "llama.cpp has no architecture" in r.stderr and not (tmp_path / "opt").exists()


# ---- the real model: a result of each space, f32 and q8_0 ------------------------------------------------------


@pytest.fixture(scope="module")
def smol_cases(tmp_path_factory):
    """SmolLM2 pruned four ways (loaded fresh each: the shared fixture stays dense)."""
    def layers():
        lm = load_model("smollm2-135m", progress=False)
        lm.dropped = tuple(lm.adapter.drop_inplace(lm.model, [3, 13, 20]).dropped)
        return lm

    def sublayers():
        lm = load_model("smollm2-135m", progress=False)
        apply_sublayers_inplace(lm, attention=[7, 22, 25], mlp=[12, 25])
        return lm

    def width():
        from evoprune.models.slicing import apply_width_inplace

        lm = load_model("smollm2-135m", progress=False)
        n = lm.n_layers
        groups = [(0, 2) if i in (4, 9, 17) else (0, 1, 2) for i in range(n)]
        channels = [tuple(range(1536 - 40 * (i % 5) - (i % 3))) for i in range(n)]  # some not multiples of 32
        apply_width_inplace(lm.model, _plan(lm.model, groups, channels))
        return lm

    return {"layers": layers, "sublayers": sublayers, "width": width}


@pytest.mark.parametrize("space", ["layers", "sublayers", "width"])
def test_smollm2_results_export_f32_and_q8_0(smol_cases, space, tmp_path):
    lm = smol_cases[space]()
    src = gguf_file("smollm2-135m")
    f32 = export_gguf(lm, tmp_path / "f32", outtype="f32", dataset="wikitext2", check_seqlen=128, gguf_source=src)
    q8 = export_gguf(lm, tmp_path / "q8", outtype="q8_0", dataset="wikitext2", check_seqlen=128, gguf_source=src)
    assert f32["architecture"] == ("llama" if space == "layers" else "deci")
    assert abs(f32["ppl_ratio"] - 1) < 1e-3 and f32["mean_abs_dlogit"] < 1e-3 * f32["logit_std"]
    assert 0.99 < q8["ppl_ratio"] < 1.05 and math.isclose(q8["evoprune_ppl"], f32["evoprune_ppl"])
    if space == "sublayers":
        assert f32["mlp_padded_layers"] and any(s["heads"] == 0 for s in f32["layers"])
    # the tokenizer and chat template come from the bundled GGUF
    import gguf

    fields = gguf.GGUFReader(str(tmp_path / "q8" / "model-q8_0.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and "tokenizer.chat_template" in fields


def test_bench_llama_cpp_engine(tiny_dirs, tmp_path):
    from evoprune.evaluate.engine_bench import bench_llama_cpp

    dense = load_model(str(tiny_dirs["llama"]), progress=False)
    pruned = _width_llama(tiny_dirs)
    res = bench_llama_cpp({"dense": dense, "pruned": pruned}, outtype="q8_0", seqlen=32, decode_tokens=4,
                          prompt_tokens=4, repeats=2, threads=1)
    assert res["engine"] == "llama.cpp" and [r["name"] for r in res["rows"]] == ["dense", "pruned"]
    assert all(len(r["prefill_tok_s_all"]) == 2 and r["decode_tok_s"] > 0 for r in res["rows"])
    assert res["params_ratio"] < 1 and res["file_ratio"] < 1 and res["ideal_speedup"] > 1
    r = _cli("bench", str(tiny_dirs["llama"]), "--drop", "1,2", "--engine", "llama.cpp", "--seqlen", "32",
             "--decode-tokens", "4", "--repeats", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["engine"] == "llama.cpp" and out["rows"][1]["layers"] == 4 and out["outtype"] == "f16"
    r = _cli("bench", str(tiny_dirs["llama"]), "--drop", "1", "--engine", "llama.cpp", "--batch", "2")
    assert r.returncode == 2 and "--batch must be 1" in r.stderr


def test_smollm2_levels_result_exports_f32_and_q8_0(tmp_path):
    """A real level run (uniform structured OBS, 30%, 2 x 64 calibration tokens): OBS-updated weights, per-layer
    widths from the level ladders, as deci."""
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    cfg = SearchConfig.build(model="smollm2-135m", calib="wikitext2", sampling="random", nsamples=2, seqlen=64,
                             space="levels", method="uniform", sparsity=0.3)
    run_search(cfg, tmp_path / "run", progress=False)
    lm = load_model(str(tmp_path / "run"), progress=False)
    src = gguf_file("smollm2-135m")
    f32 = export_gguf(lm, tmp_path / "f32", outtype="f32", check_seqlen=128, gguf_source=src)
    q8 = export_gguf(lm, tmp_path / "q8", outtype="q8_0", check_seqlen=128, gguf_source=src)
    assert f32["architecture"] == "deci" and abs(f32["ppl_ratio"] - 1) < 1e-3
    # OBS-updated weights from 128 tokens damage the model more than a search's (ppl ~2000 on the check tokens):
    # the logits agree to 2e-3 x std, and q8_0's rounding moves its perplexity by a few percent either way
    assert f32["mean_abs_dlogit"] < 2e-3 * f32["logit_std"] and 0.95 < q8["ppl_ratio"] < 1.05
