"""``evoprune bench --engine llama.cpp``: the dense and the pruned model as GGUF files, timed in llama.cpp.

Owns :func:`bench_llama_cpp`. Both models are written at the same ``--outtype``
(:func:`evoprune.export.gguf.gguf_of`: the same writer and quantizer as the export) into a temporary directory,
then loaded by llama.cpp in turn with the same thread count and context and timed, alternating between them:
prefill of ``seqlen`` random tokens (tokens/s) and ``decode_tokens`` greedy tokens after a ``prompt_tokens``
prompt (tokens/s), medians over ``repeats`` after one warm-up. Sizes: parameters (of the models as evoprune
holds them) and the GGUF file bytes (the weights llama.cpp maps). The ideal speedups are the FLOP ratios of
:mod:`evoprune.evaluate.flops`, as for the transformers engine.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..export.gguf import check_outtype, gguf_of
from ..models.gguf import gguf_arch
from .flops import ideal_speedup
from .llamacpp import open_gguf, require_llama_cpp

__all__ = ["bench_llama_cpp", "check_engine_args"]


def bench_llama_cpp(models: dict, *, outtype: str = "f16", seqlen: int = 512, decode_tokens: int = 32,
                    prompt_tokens: int = 16, repeats: int = 5, threads: int | None = None,
                    gguf_source: Path | None = None, seed: int = 0) -> dict:
    """Time ``models`` (name -> loaded model, dense first) as ``outtype`` GGUF files in llama.cpp (module docstring).

    Returns rows (per model: params, file bytes, prefill / decode tokens/s and their per-repeat lists), the
    measured and ideal speedups of the second model over the first, and the conditions.
    """
    check_outtype(outtype)
    require_llama_cpp()
    for lm in models.values():
        gguf_arch(lm.model)  # what llama.cpp cannot express is refused before anything is written (no copies)
    threads = int(threads or os.cpu_count() or 1)
    n_ctx = max(seqlen, prompt_tokens + decode_tokens) + 8
    rows = []
    with tempfile.TemporaryDirectory(prefix="evoprune-bench-") as d:
        files = {}
        for name, lm in models.items():
            files[name] = gguf_of(lm, Path(d) / f"{name}-{outtype}.gguf", outtype, gguf_source=gguf_source,
                                  threads=threads)
            info = lm.adapter.info(lm.model)
            rows.append({"name": name, "model": lm.name, "layers": info["layers"], "params": info["params"],
                         "file_bytes": files[name].stat().st_size, "info": info, "prefill_tok_s_all": [],
                         "decode_tok_s_all": []})
        rng = np.random.default_rng(seed)
        vocab = int(next(iter(models.values())).model.config.vocab_size)
        ids, prompt = rng.integers(0, vocab, seqlen).tolist(), rng.integers(0, vocab, prompt_tokens).tolist()
        for rep in range(repeats + 1):  # repeat 0 is the warm-up
            for row in rows:
                with open_gguf(files[row["name"]], n_ctx=n_ctx, threads=threads) as cpp:
                    pre, dec = cpp.prefill_tok_s(ids), cpp.decode_tok_s(prompt, decode_tokens)
                if rep:
                    row["prefill_tok_s_all"].append(round(pre, 3))
                    row["decode_tok_s_all"].append(round(dec, 3))
    for row in rows:
        row["prefill_tok_s"] = statistics.median(row["prefill_tok_s_all"])
        row["decode_tok_s"] = statistics.median(row["decode_tok_s_all"])
    dense, pruned = rows[0], rows[-1]
    ideal = ideal_speedup(dense["info"], pruned["info"])
    measured = {"prefill": pruned["prefill_tok_s"] / dense["prefill_tok_s"],
                "decode": pruned["decode_tok_s"] / dense["decode_tok_s"]}
    return {"engine": "llama.cpp", "outtype": outtype, "threads": threads, "rows": rows, "speedup": measured,
            "ideal_speedup": ideal, "speedup_over_ideal": {k: v / ideal for k, v in measured.items()},
            "params_ratio": pruned["params"] / dense["params"],
            "file_ratio": pruned["file_bytes"] / dense["file_bytes"], "seqlen": seqlen,
            "decode_tokens": decode_tokens, "prompt_tokens": prompt_tokens, "repeats": repeats, "warmup": 1}


def check_engine_args(engine: str, batch: int) -> None:
    """:class:`UserError` for options the llama.cpp engine does not take."""
    if engine == "llama.cpp" and batch != 1:
        raise UserError("--engine llama.cpp times one sequence at a time: --batch must be 1")
