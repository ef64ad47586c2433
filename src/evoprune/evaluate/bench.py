"""Speed and memory: dense vs pruned model, measured in one run.

Owns ``evoprune bench`` (:func:`cmd_bench`, :func:`add_bench_parser`), the library
call :func:`bench`, and the FLOP model behind the ideal speedup
(:func:`forward_flops`, :func:`ideal_speedup`).

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
* **parameter count** (tied weights once).

The two models are timed alternately (dense, pruned, dense, ...) so that
background load on a shared machine affects both alike.

Ideal speedup: :func:`forward_flops` estimates a forward pass's FLOPs from
``adapter.info`` — ``2 x params`` per token for every decoder block's matrices
plus the attention score / value products ``4 x heads x head_dim x context``
per token and block, optionally the LM head. Per-block lists (``layer_params``,
``layer_heads`` in the info, as width pruning will report them) are used when
present, else the totals are spread evenly over the blocks. For layer
dropping the block-only ratio is exactly ``L / (L - k)``; for width pruning it
is the FLOP ratio. ``with_head`` variants add the LM head (last position only
in prefill, every step in decode) to show what fixed cost bounds the speedup.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import inspect
import json
import math
import os
import re
import statistics
import threading
import time
from pathlib import Path

from ..errors import UserError

__all__ = ["forward_flops", "ideal_speedup", "find_base", "bench", "format_table", "cmd_bench", "add_bench_parser"]


# ---------------------------------------------------------------------------------------------------------------
# FLOP model


def _per_layer(info: dict, key: str, total_key: str | None, default) -> list[float]:
    n = int(info["layers"])
    val = info.get(key)
    if isinstance(val, (list, tuple)):
        if len(val) != n:
            raise ValueError(f"info[{key!r}] has {len(val)} entries for {n} layers")
        return [float(v) for v in val]
    if total_key is not None and info.get(total_key) is not None:
        return [float(info[total_key]) / n] * n if n else []
    return [float(default)] * n


def forward_flops(info: dict, *, new_tokens: int = 1, ctx: float = 0.0, logits_tokens: int = 0) -> float:
    """Estimated FLOPs of one forward pass of the model described by ``info`` (``adapter.info``).

    ``new_tokens`` tokens are processed, each attending to ``ctx`` positions on
    average; ``logits_tokens`` of them go through the LM head (0: blocks only).
    Per block: ``2 x block params`` per token (the matrix multiplies) plus
    ``4 x heads x head_dim x ctx`` per token (scores and weighted values).
    """
    layer_params = _per_layer(info, "layer_params", "block_params", 0)
    layer_heads = _per_layer(info, "layer_heads", None, info.get("heads", 0))
    hd = float(info.get("head_dim", 0))
    blocks = sum(2.0 * p * new_tokens + 4.0 * h * hd * ctx * new_tokens for p, h in zip(layer_params, layer_heads))
    head = 2.0 * float(info.get("hidden", 0)) * float(info.get("vocab", 0)) * logits_tokens
    return blocks + head


def ideal_speedup(dense_info: dict, pruned_info: dict, *, new_tokens: int = 1, ctx: float = 0.0,
                  logits_tokens: int = 0) -> float:
    """Dense / pruned FLOPs of the same forward pass (see :func:`forward_flops`).

    With the defaults (decoder-block matrices only) this is ``L / (L - k)`` for
    dropping ``k`` of ``L`` equal blocks, and the FLOP ratio for width pruning.
    """
    kw = dict(new_tokens=new_tokens, ctx=ctx, logits_tokens=logits_tokens)
    num, den = forward_flops(dense_info, **kw), forward_flops(pruned_info, **kw)
    return num / den if den > 0 else math.inf


# ---------------------------------------------------------------------------------------------------------------
# finding the dense base


def find_base(spec: str, base: str | None = None) -> tuple[str, list[int] | None, str]:
    """The dense base model of ``spec``: ``(base spec, dropped layers or None, how it was found)``.

    ``base`` (``--base``) wins; else a run directory's ``config.json`` model, else
    an exported directory's ``pruning.json`` ``base_model``. Raises
    :class:`UserError` when none applies.
    """
    from ..record import RunDir, is_run_dir

    p = Path(spec).expanduser()
    dropped, found, how = None, None, None
    if p.is_dir() and is_run_dir(p):
        run = RunDir(p)
        found = run.read_config().get("model")
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


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _forward_kwargs(model) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _prefill(model, ids, kw):
    return model(input_ids=ids, use_cache=True, **kw)


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


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap memory back to the OS so that the next pass's RSS growth is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakCPU:
    """Peak RSS growth over a ``with`` block, by the best method available (see the module docstring)."""

    def __init__(self):
        self.method = None
        self.extra = 0

    def __enter__(self):
        _trim()
        self.base = _rss_bytes()
        if self.base is not None and _hwm_bytes() is not None and _reset_hwm():
            self.method = "vmhwm"
            return self
        try:
            import psutil

            proc = psutil.Process()
            self.base = proc.memory_info().rss
            self.peak, self.stop = self.base, threading.Event()

            def poll():
                while not self.stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self.thread = threading.Thread(target=poll, daemon=True)
            self.thread.start()
            self.method = "psutil"
            return self
        except ImportError:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss"
            return self

    def __exit__(self, *exc):
        if self.method == "vmhwm":
            self.extra = max(0, (_hwm_bytes() or 0) - self.base)
        elif self.method == "psutil":
            self.stop.set()
            self.thread.join()
            self.extra = max(0, self.peak - self.base)
        else:
            import resource

            self.extra = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)
        return False


MEM_METHODS = {
    "cuda": "weights + (torch.cuda.max_memory_allocated - allocated before) over one prefill+decode pass",
    "vmhwm": "weights (param+buffer bytes) + peak RSS growth over one prefill+decode pass (VmHWM reset via "
             "/proc/self/clear_refs)",
    "psutil": "weights (param+buffer bytes) + peak RSS growth over one prefill+decode pass (psutil, sampled every ms)",
    "ru_maxrss": "weights (param+buffer bytes) + growth of the process's ru_maxrss (a lower bound)",
}


def _peak_extra(model, ids, prompt, n, kw, device) -> tuple[int, str]:
    import torch

    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = _prefill(model, ids, kw)
        del out
        _decode(model, prompt, n, kw, device)
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before), "cuda"
    with _PeakCPU() as pk:
        out = _prefill(model, ids, kw)
        del out
        _decode(model, prompt, n, kw, device)
    return pk.extra, pk.method


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
        state[name] = (model, ids, prompt, _forward_kwargs(model))
        rows.append({"name": name, "model": lm.name, "layers": info["layers"], "params": info["params"],
                     "weight_bytes": _model_bytes(model), "info": info, "prefill_s": [], "decode_s": []})
    by_name = {r["name"]: r for r in rows}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # repeat 0 is the warm-up
            for name, (model, ids, prompt, kw) in state.items():
                _sync(device)
                t0 = time.perf_counter()
                out = _prefill(model, ids, kw)
                _sync(device)
                dt = time.perf_counter() - t0
                del out
                dd = _decode(model, prompt, decode_tokens, kw, device)
                if rep:
                    by_name[name]["prefill_s"].append(dt)
                    by_name[name]["decode_s"].append(dd)
        method = None
        for name, (model, ids, prompt, kw) in state.items():
            extra, method = _peak_extra(model, ids, prompt, decode_tokens, kw, device)
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


def _speedups(res: dict, batch: int, seqlen: int, decode_tokens: int, prompt_tokens: int) -> dict:
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
    }


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def format_table(res: dict) -> str:
    """A plain-text table of :func:`cmd_bench`'s result: one line per model, then the speedups."""
    head = ("model", "layers", "params", "prefill ms", "prefill tok/s", "decode tok/s", "weights MiB", "peak MiB")
    lines = [head]
    for r in res["rows"]:
        lines.append((r["name"], str(r["layers"]), f"{r['params'] / 1e6:.2f}M", f"{r['prefill_ms']:.1f}",
                      f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", _mb(r["weight_bytes"]),
                      _mb(r["peak_mem_bytes"])))
    w = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in lines]
    out.insert(1, "-" * len(out[0]))
    s, i, o, ih = res["speedup"], res["ideal_speedup"], res["speedup_over_ideal"], res["ideal_speedup_with_head"]
    out.append("-" * len(out[0]))
    out.append(f"speedup dense/pruned: prefill {s['prefill']:.3f}x, decode {s['decode']:.3f}x; "
               f"ideal (block FLOPs) {i:.3f}x -> {100 * o['prefill']:.1f}% / {100 * o['decode']:.1f}% of ideal")
    out.append(f"ideal incl. LM head: prefill {ih['prefill']:.3f}x, decode {ih['decode']:.3f}x; "
               f"params x{res['params_ratio']:.3f}, peak memory x{res['peak_mem_ratio']:.3f}")
    out.append(f"batch {res['batch']}, seqlen {res['seqlen']}, {res['decode_tokens']} decode tokens after a "
               f"{res['prompt_tokens']}-token prompt, median of {res['repeats']} after 1 warm-up, {res['device']}, "
               f"{res['threads']} threads; memory: {res['mem_method_text']}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _load_spec(spec: str, args):
    from ..cli import _load

    ns = copy.copy(args)
    ns.model = spec
    return _load(ns)


def cmd_bench(args) -> int:
    """``evoprune bench``: load the dense base and the pruned model, measure both, print a table and JSON."""
    import torch

    from ..cli import _drop_arg, _emit

    drop = _drop_arg(args.drop)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device available")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory; give a file name")
    if drop:
        if args.base:
            raise UserError("--drop prunes MODEL itself in memory; it cannot be combined with --base")
        base, dropped, how = args.model, list(drop), "--drop"
    else:
        base, dropped, how = find_base(args.model, args.base)
    for name, val in (("batch", args.batch), ("seqlen", args.seqlen), ("decode_tokens", args.decode_tokens),
                      ("prompt_tokens", args.prompt_tokens), ("repeats", args.repeats)):
        if val < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {val}")
    dense = _load_spec(base, args)
    if drop:
        if dense.dropped:
            raise UserError(f"--drop cannot be combined with a run directory ({args.model} already drops "
                            f"{list(dense.dropped)})")
        pruned = copy.copy(dense)
        pruned.model = copy.deepcopy(dense.model)
        pruned.adapter.drop_inplace(pruned.model, drop)
        pruned.name, pruned.dropped = f"{args.model} --drop {args.drop}", tuple(drop)
    else:
        pruned = _load_spec(args.model, args)
        if dropped is None:
            dropped = list(pruned.dropped) or None
    dense.name = base
    res = bench({"dense": dense, "pruned": pruned}, batch=args.batch, seqlen=args.seqlen,
                decode_tokens=args.decode_tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                device=args.device)
    res = {"model": args.model, "base": base, "base_from": how, "dropped_layers": dropped,
           "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "batch": args.batch, "seqlen": args.seqlen, "decode_tokens": args.decode_tokens,
           "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "warmup": 1,
           "torch_version": torch.__version__, **res}
    res.update(_speedups(res, args.batch, args.seqlen, args.decode_tokens, args.prompt_tokens))
    if res["device"].startswith("cuda"):
        res["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    print(format_table(res))
    _emit(res, args.out)
    return 0


def add_bench_parser(sub) -> None:
    """Register ``evoprune bench`` on the CLI's subparsers."""
    p = sub.add_parser("bench", help="prefill latency, decode tokens/s, peak memory and params: dense vs pruned")
    p.add_argument("model", help="pruned model: run directory, exported directory (pruning.json), or any model "
                                 "spec with --base / --drop")
    p.add_argument("--base", default=None, help="dense base model spec (default: from the run config or pruning.json)")
    p.add_argument("--drop", default=None, help="compare MODEL with MODEL minus these blocks (pruned in memory)")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="prefill tokens per sequence (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens generated (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length before decoding (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats after 1 warm-up; medians reported (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_bench)
