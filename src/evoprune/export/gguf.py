"""GGUF export for llama.cpp / Ollama / LM Studio, checked by llama.cpp itself.

Owns :func:`export_gguf`. The model as it is in memory (any space's result, fine-tuned or not) is described
by :func:`evoprune.models.gguf.gguf_model` (blocks of one size: the family's architecture; otherwise
``deci`` with per-layer arrays), written as f32 with the ``gguf`` package, then converted to ``--outtype``
by llama.cpp's own quantizer. The tokenizer and chat template come from the source model: copied from its
GGUF when it has one, else written by the ``gguf`` package's vocab helpers from the HF tokenizer.

Check (every export): llama.cpp loads the written file and evaluates held-out windows of token ids from
evoprune's tokenizer; evoprune's in-memory model evaluates the same ids. f32 / f16 must match in logits
(mean ``|dlogit|`` relative to the logits' standard deviation: the largest single difference grows with
position in a badly damaged model, where two summation orders drift apart) and in mean NLL; quantized types
in perplexity, within a stated ratio (:data:`TOLERANCES`). A failed check, like any error, leaves nothing
behind (the directory is built in a temporary sibling and moved into place). Written: ``model-<outtype>.gguf``,
``pruning.json`` (what was removed, the layer sizes, the checks) and an Ollama ``Modelfile``.
"""
from __future__ import annotations

import ctypes
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, user_input
from ..files import atomic_dir
from ..models.gguf import GGUFModel, gguf_model
from ..models.hooks import model_device
from ..version import __version__
from .checked import ExportError, check_out_dir, n_params

__all__ = ["OUTTYPES", "TOLERANCES", "export_gguf", "check_outtype", "write_gguf", "quantize", "gguf_of", "ff_multiple"]

# --outtype -> llama.cpp's llama_ftype (include/llama.h)
OUTTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}
# per outtype: (mean |dlogit| / the reference logits' std, |mean NLL difference| in nats, llama.cpp ppl / evoprune
# ppl at most): f32 agrees to the rounding of another summation order, f16 to half precision; quantized types
# are held to a perplexity ratio only (their logits move by design).
# Measured on SmolLM2 results of every space (docs/RESULTS.md, "GGUF in llama.cpp"): f32 perplexity within 1.6e-4
# relative, mean |dlogit| / std ~3e-4; q8_0 ratio 1.0055-1.0202 (levels' OBS-updated weights the highest). The
# float bounds leave room for badly damaged models, whose two summation orders drift further apart.
TOLERANCES = {"f32": (0.01, 5e-3, 1.005), "f16": (0.02, 1e-2, 1.01), "q8_0": (None, None, 1.05),
              "q4_k_m": (None, None, 1.3)}
CHECK_WINDOWS, CHECK_SEQLEN = 2, 256
QUANT_BLOCK = 32  # llama.cpp's quantizer needs rows of a multiple of 32 (q8_0; q4_k falls back to q5_0 on them)


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    return outtype


def _copy_tokenizer(w, src: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(src))
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)


def _hf_tokenizer(w, tokenizer, n_vocab: int) -> None:
    import gguf
    from gguf import vocab as gv

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        vocab = None
        for cls in (gv.BpeVocab, gv.SentencePieceVocab, gv.LlamaHfVocab):
            try:
                vocab = cls(Path(d))
                break
            except (FileNotFoundError, ValueError, TypeError, KeyError):
                continue
        if vocab is None:
            raise UserError("--format gguf: the model's tokenizer is neither a byte-level BPE nor a SentencePiece "
                            "tokenizer; llama.cpp's vocabulary cannot be written for it")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        for i in range(len(tokens), n_vocab):  # the embedding has more rows than the tokenizer: unused entries
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            w.add_tokenizer_pre("default")
        w.add_token_list(tokens[:n_vocab])
        w.add_token_scores(scores[:n_vocab])
        w.add_token_types(types[:n_vocab])
        gv.SpecialVocab(d, load_merges=True, n_vocab=n_vocab).add_to_gguf(w)


def write_gguf(gm: GGUFModel, path: Path, *, name: str, tokenizer=None, gguf_source: Path | None = None) -> None:
    """Write ``gm`` as an f32 GGUF file at ``path`` with the tokenizer of ``gguf_source`` (or ``tokenizer``)."""
    import gguf

    hp = gm.hparams
    w = gguf.GGUFWriter(str(path), gm.arch)
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(OUTTYPES["f32"])
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    one = (lambda xs: xs[0]) if gm.homogeneous else list  # deci: per-layer arrays
    w.add_feed_forward_length(one([s.ff for s in gm.layers]))
    w.add_head_count(one([s.heads for s in gm.layers]))
    w.add_head_count_kv(one([s.kv_heads for s in gm.layers]))
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_rope_dimension_count(hp["head_dim"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_vocab_size(hp["vocab_size"])
    scaling = hp["rope_scaling"]
    if scaling is not None and scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if gguf_source is not None:
        _copy_tokenizer(w, gguf_source)
    elif tokenizer is not None:
        _hf_tokenizer(w, tokenizer, hp["vocab_size"])
    for tname, arr in gm.tensors.items():
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, outtype: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``): ``src`` (f32 GGUF) to ``outtype`` at ``dst``; its
    log goes to ``dst`` + ``.log`` and is removed on success."""
    import llama_cpp

    from ..evaluate.llamacpp import last_line, native_output

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = OUTTYPES[outtype]
    params.nthread = int(threads or 0)
    log = dst.with_name(dst.name + ".log")
    with native_output(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise ExportError(f"llama.cpp's quantizer failed to write {outtype}: {last_line(log) or f'return code {rc}'}")
    log.unlink()


def ff_multiple(outtype: str) -> int:
    """What MLP widths are rounded up to for ``outtype``: a quantizer block, or 1 for float types."""
    return 1 if outtype in ("f32", "f16") else QUANT_BLOCK


def gguf_of(lm, path: Path, outtype: str, *, gguf_source: Path | None = None, threads: int | None = None,
            gm: GGUFModel | None = None) -> Path:
    """``lm`` (or its already built ``gm``) written to ``path`` as an unchecked ``outtype`` GGUF: f32 by the
    ``gguf`` package, other types through llama.cpp's quantizer from a temporary f32 file; returns ``path``."""
    gm = gm if gm is not None else gguf_model(lm.model, ff_multiple(outtype))
    name = f"{Path(str(lm.name or 'model')).name} (evoprune)"
    if outtype == "f32":
        write_gguf(gm, path, name=name, tokenizer=lm.tokenizer, gguf_source=gguf_source)
        return path
    f32 = path.with_name("." + path.name + ".f32")
    try:
        write_gguf(gm, f32, name=name, tokenizer=lm.tokenizer, gguf_source=gguf_source)
        quantize(f32, path, outtype, threads)
    finally:
        f32.unlink(missing_ok=True)
    return path


@torch.no_grad()
def _reference(model, windows: torch.Tensor) -> tuple[np.ndarray, float]:
    """evoprune's logits of the first window and mean NLL over all windows (fp32)."""
    total, n, first = 0.0, 0, None
    for row in windows:
        logits = model(input_ids=row[None].to(model_device(model)), use_cache=False).logits[0].float().cpu()
        if first is None:
            first = logits.numpy()
        nll = torch.nn.functional.cross_entropy(logits[:-1], row[1:], reduction="sum")
        total, n = total + float(nll), n + len(row) - 1
    return first, total / n


def _windows(lm, dataset: str, seqlen: int) -> torch.Tensor:
    from ..data.sources import get_text
    from ..evaluate.perplexity import tokenize_text, windows

    return windows(tokenize_text(lm.tokenizer, get_text(dataset, "eval")), seqlen, CHECK_WINDOWS)


def export_gguf(lm, out: str | Path, *, outtype: str = "f16", overwrite: bool = False, dataset: str = "wikitext2",
                gguf_source: Path | None = None, extra: dict | None = None, threads: int | None = None,
                check_seqlen: int = CHECK_SEQLEN) -> dict:
    """Write ``lm`` (a loaded, possibly pruned model) to ``out`` as ``model-<outtype>.gguf`` and check it in
    llama.cpp (module docstring). Returns the ``pruning.json`` record with the checks and ``file``.

    :class:`UserError` (nothing written) for a structure llama.cpp cannot express, an unknown ``outtype`` or a
    non-empty ``out``; :class:`~evoprune.export.checked.ExportError` when llama.cpp disagrees.
    """
    from ..evaluate.llamacpp import open_gguf, require_llama_cpp

    check_outtype(outtype)
    out = check_out_dir(out, overwrite)
    require_llama_cpp()
    # refuses what llama.cpp cannot express, before any file is written
    gm = gguf_model(lm.model, ff_multiple(outtype))
    check_seqlen = min(check_seqlen, gm.hparams["context_length"])
    wins = _windows(lm, dataset, check_seqlen)
    ref_logits, ref_nll = _reference(lm.model, wins)
    fname = f"model-{outtype}.gguf"
    with user_input("--out directory", out, formats=False), atomic_dir(out) as tmp:
        gguf_of(lm, tmp / fname, outtype, gguf_source=gguf_source, threads=threads, gm=gm)
        with open_gguf(tmp / fname, n_ctx=check_seqlen, threads=threads) as cpp:
            got_logits = cpp.logits(wins[0].tolist())
            got_nll = cpp.nll(wins.numpy())
        rel_logit, d_nll, ratio_max = TOLERANCES[outtype]
        checks = {"check_dataset": dataset, "check_tokens": int(wins.numel()), "evoprune_ppl": math.exp(ref_nll),
                  "llama_cpp_ppl": math.exp(got_nll), "ppl_ratio": math.exp(got_nll - ref_nll),
                  "max_abs_dlogit": float(np.abs(got_logits - ref_logits).max()),
                  "mean_abs_dlogit": float(np.abs(got_logits - ref_logits).mean()),
                  "logit_std": float(ref_logits.std())}
        problems = []
        if rel_logit is not None and checks["mean_abs_dlogit"] > rel_logit * checks["logit_std"]:
            problems.append(f"mean |dlogit| {checks['mean_abs_dlogit']:.3g} > {rel_logit} x the logits' std "
                            f"{checks['logit_std']:.3g}")
        if d_nll is not None and abs(got_nll - ref_nll) > d_nll:
            problems.append(f"mean NLL {got_nll:.5f} vs evoprune's {ref_nll:.5f} (more than {d_nll} apart)")
        if not checks["ppl_ratio"] <= ratio_max:
            problems.append(f"perplexity {checks['llama_cpp_ppl']:.3f} vs evoprune's {checks['evoprune_ppl']:.3f} "
                            f"(ratio above {ratio_max})")
        if problems:
            raise ExportError("GGUF check failed: llama.cpp's " + "; ".join(problems))
        record = {"format": "gguf", "file": fname, "outtype": outtype, "architecture": gm.arch,
                  "base_model": lm.base, "n_layers": len(gm.layers),
                  "layers": [{"heads": s.heads, "kv_heads": s.kv_heads, "ff": s.ff} for s in gm.layers],
                  "mlp_padded_layers": gm.padded_mlp, "attention_padded_layers": gm.padded_attention,
                  "params": n_params(lm.model),
                  "gguf_params": int(sum(a.size for a in gm.tensors.values())),
                  "dropped_layers": list(lm.dropped), **(extra or {}), **checks, "evoprune_version": __version__}
        (tmp / "pruning.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "Modelfile").write_text(f"FROM ./{fname}\n")
    return {**record, "out": str(out)}
