"""Speed and memory: dense vs pruned model, measured in one run.

Owns the library call :func:`bench`, :func:`speedups` and :func:`find_base` (the dense base of a
pruned model spec); the FLOP model is :mod:`.flops`, peak memory :mod:`.memory`, the command
``evoprune bench`` :mod:`evoprune.cli.evaluate`.

What is measured, per model (dense base and pruned), on random token ids:

* **prefill latency**: one forward of ``batch x seqlen`` tokens that builds the KV
  cache and, where the model supports ``logits_to_keep``, computes only the last
  position's logits (as generation does); median over ``repeats`` after one
  warm-up;
* **decode tokens/s**: greedy generation with the KV cache, written as a manual
  loop (prefill a ``prompt_tokens`` prompt untimed, then ``decode_tokens`` single
  token steps timed); ``batch x decode_tokens / time``, median over repeats;
* **peak memory**: weight bytes (parameters + buffers) plus the peak *extra*
  memory of one prefill + decode pass. On CUDA the extra is
  ``torch.cuda.max_memory_allocated`` minus the allocation before the pass; on
  CPU it is the peak resident-set growth during the pass, read from ``VmHWM``
  after resetting it through ``/proc/self/clear_refs`` (Linux), else sampled
  with ``psutil`` every millisecond, else ``ru_maxrss`` growth (a lower bound).
  The JSON's ``mem_method`` says which one was used;
* **KV-cache bytes** after the prefill (every key/value tensor the cache holds; an attention-free block
  of a sub-layer-pruned model holds only a one-slot stub);
* **parameter count** (tied weights once).

The two models are timed alternately (dense, pruned, dense, ...) so that
background load on a shared machine affects both alike.

Ideal speedup: see :mod:`.flops`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..errors import UserError
from ..models.hooks import last_logits_kwargs
from .flops import ideal_speedup
from .memory import MEM_METHODS, model_bytes, peak_extra

__all__ = ["find_base", "bench", "speedups", "cache_bytes"]


# ---------------------------------------------------------------------------------------------------------------
# finding the dense base


def find_base(spec: str, base: str | None = None) -> tuple[str, list[int] | None, str]:
    """The dense base model of ``spec``: ``(base spec, dropped layers or None, how it was found)``.

    ``base`` (``--base``) wins; else a run directory's ``config.json`` model, else
    an exported directory's ``pruning.json`` ``base_model``. Raises
    :class:`UserError` when none applies.
    """
    from ..runner.pruned import run_base_model
    from ..runner.rundir import RunDir, is_run_dir

    p = Path(spec).expanduser()
    dropped, found, how = None, None, None
    if p.is_dir() and is_run_dir(p):
        run = RunDir(p)
        found = run_base_model(run)
        res = run.read_result()
        dropped = list(res.get("dropped_layers", ())) if res else None
        how = "run config"
    elif p.is_dir() and (p / "pruning.json").is_file():
        try:
            rec = json.loads((p / "pruning.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p / 'pruning.json'}: corrupted ({type(e).__name__})") from None
        found = rec.get("base_model")
        dropped = list(rec.get("dropped_layers", ())) or None
        how = "pruning.json"
    if base is not None:
        return str(base), dropped, "--base"
    if not found:
        raise UserError(f"cannot tell the dense base of {spec} (not a run directory or an export with pruning.json): "
                        f"give --base SPEC, or --drop LAYERS to prune it in memory")
    return str(found), dropped, how


# ---------------------------------------------------------------------------------------------------------------
# measuring


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model, ids, kw):
    return model(input_ids=ids, use_cache=True, **kw)


def cache_bytes(cache) -> int:
    """Bytes of every tensor a KV cache holds (a transformers ``Cache`` with ``layers``, or legacy tuples)."""
    import torch

    def walk(x) -> int:
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(walk(y) for y in x)
        return 0

    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(walk(getattr(layer, name, None)) for layer in layers for name in ("keys", "values"))
    return walk(cache)


def _one_pass(model, ids, prompt, n: int, kw, device) -> None:
    out = _prefill(model, ids, kw)
    del out
    _decode(model, prompt, n, kw, device)


def _decode(model, prompt, n: int, kw, device) -> float:
    """Greedy decode ``n`` tokens after an untimed prefill of ``prompt``; seconds spent decoding."""
    out = model(input_ids=prompt, use_cache=True, **kw)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True, **kw)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def bench(models: dict, *, batch: int = 1, seqlen: int = 512, decode_tokens: int = 32, prompt_tokens: int = 16,
          repeats: int = 5, device: str = "cpu", seed: int = 0) -> dict:
    """Time and size each of ``models`` (name -> :class:`~evoprune.models.LoadedModel`), alternating between them.

    Returns ``{"rows": [...], "mem_method": ...}``; each row has ``prefill_ms``
    (median), ``decode_tok_s`` (median), the raw per-repeat lists, ``params``,
    ``weight_bytes``, ``peak_mem_bytes`` and ``info``.
    """
    import torch

    for name, val in (("batch", batch), ("seqlen", seqlen), ("decode_tokens", decode_tokens),
                      ("prompt_tokens", prompt_tokens), ("repeats", repeats)):
        if int(val) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {val}")
    rows, state = [], {}
    for name, lm in models.items():
        model = lm.model.eval()
        info = lm.adapter.info(model)
        vocab = int(model.config.vocab_size)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and max(seqlen, prompt_tokens + decode_tokens) > limit:
            raise UserError(f"{name}: --seqlen / --prompt-tokens + --decode-tokens exceed the model's "
                            f"{limit} positions")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seqlen), generator=g).to(device)
        prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=g).to(device)
        state[name] = (model, ids, prompt, last_logits_kwargs(model))
        rows.append({"name": name, "model": lm.name, "layers": info["layers"], "params": info["params"],
                     "weight_bytes": model_bytes(model), "info": info, "prefill_s": [], "decode_s": []})
    by_name = {r["name"]: r for r in rows}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # repeat 0 is the warm-up
            for name, (model, ids, prompt, kw) in state.items():
                _sync(device)
                t0 = time.perf_counter()
                out = _prefill(model, ids, kw)
                _sync(device)
                dt = time.perf_counter() - t0
                by_name[name]["kv_cache_bytes"] = cache_bytes(out.past_key_values)
                del out
                dd = _decode(model, prompt, decode_tokens, kw, device)
                if rep:
                    by_name[name]["prefill_s"].append(dt)
                    by_name[name]["decode_s"].append(dd)
        method = None
        for name, (model, ids, prompt, kw) in state.items():
            extra, method = peak_extra(lambda: _one_pass(model, ids, prompt, decode_tokens, kw, device), device)
            r = by_name[name]
            r["act_peak_bytes"] = extra
            r["peak_mem_bytes"] = r["weight_bytes"] + extra
    for r in rows:
        p, d = statistics.median(r["prefill_s"]), statistics.median(r["decode_s"])
        r["prefill_ms"] = 1000 * p
        r["prefill_tok_s"] = batch * seqlen / p
        r["decode_tok_s"] = batch * decode_tokens / d
        r["decode_ms_per_step"] = 1000 * d / decode_tokens
        r["prefill_ms_all"] = [round(1000 * x, 3) for x in r.pop("prefill_s")]
        r["decode_tok_s_all"] = [round(batch * decode_tokens / x, 3) for x in r.pop("decode_s")]
        r["logits_to_keep"] = state[r["name"]][3].get("logits_to_keep")
    return {"rows": rows, "mem_method": method, "mem_method_text": MEM_METHODS.get(method, method)}


def speedups(res: dict, batch: int, seqlen: int, decode_tokens: int, prompt_tokens: int) -> dict:
    dense, pruned = res["rows"][0], res["rows"][1]
    di, pi = dense["info"], pruned["info"]
    ideal = ideal_speedup(di, pi)
    prefill_ctx = (seqlen + 1) / 2
    decode_ctx = prompt_tokens + (decode_tokens + 1) / 2
    ideal_head = {
        "prefill": ideal_speedup(di, pi, new_tokens=batch * seqlen, ctx=prefill_ctx, logits_tokens=batch),
        "decode": ideal_speedup(di, pi, new_tokens=batch, ctx=decode_ctx, logits_tokens=batch),
    }
    measured = {"prefill": dense["prefill_ms"] / pruned["prefill_ms"],
                "decode": pruned["decode_tok_s"] / dense["decode_tok_s"]}
    return {
        "speedup": measured,
        "ideal_speedup": ideal,
        "speedup_over_ideal": {k: v / ideal for k, v in measured.items()},
        "ideal_speedup_with_head": ideal_head,
        "params_ratio": pruned["params"] / dense["params"],
        "peak_mem_ratio": pruned["peak_mem_bytes"] / dense["peak_mem_bytes"],
        "kv_cache_ratio": pruned["kv_cache_bytes"] / dense["kv_cache_bytes"] if dense["kv_cache_bytes"] else None,
    }
