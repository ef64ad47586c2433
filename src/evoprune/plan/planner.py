"""What a search will cost before it runs: memory per worker, token-layers, FLOPs, wall time, workers.

Owns :func:`make_plan`. Given a :class:`~evoprune.runner.config.SearchConfig` and the model built on the
``meta`` device (:mod:`evoprune.plan.model`), it predicts

- **memory** of one worker, in bytes: the weights (parameters x dtype size); the dense hidden-state
  caches of the layer spaces, one per fidelity stage: ``len(checkpoints) x stage tokens x hidden x
  dtype size`` (:mod:`evoprune.fitness.checkpoints`; ``--cache-every auto`` resolved as the run resolves
  it against the free memory of a GPU, :func:`~evoprune.fitness.checkpoints.choose_every`); the KL
  targets of ``--fitness kl`` (``predicted tokens x (4 x vocab)``, top-k: ``12 K + 4``); the LRU
  (``--cache-mb``; ``auto`` for the layer spaces: at most its default of what the dense caches leave,
  :func:`~evoprune.fitness.checkpoints.fit_caches`); width ``--reconstruct ls``: the float32 output-projection
  Hessians of every block, a dense copy of those projections and the 512 MiB of solved columns
  (:class:`~evoprune.prune.reconstruct.Reconstruction`); the training state of training-aware levels (projection copies, their gradients and
  AdamW moments for ``full``; the LoRA factors for ``lora``) and an estimate of the transient
  activations of one batch (logits in the model dtype plus two fp32 copies for the NLL, three more for KL,
  and one block's working set ``B x T x (6 hidden + 3 intermediate)``; training adds every block's saved
  activations);
- **token-layers**: the setup (dense forwards of the stage caches, importance scores, the level
  database's and the width reconstruction's Hessian passes) exactly, per candidate and stage (the most a candidate can cost), and per run
  from a dry run of the method's own strategy (:mod:`evoprune.plan.simulate`: exact for methods whose
  choices do not depend on losses, a sample otherwise), beside SLEB's on the same layer problem;
- **FLOPs** with the LM head (:mod:`evoprune.plan.flops`) and the **wall time** at ``tflops`` per GPU
  with utilisation ``mfu``: ``FLOPs / (GPUs computing at once x tflops x mfu)``, which assumes every
  asked batch keeps all workers busy (SLEB's steps and evo's generations are wider than a few workers;
  the last greedy steps and a one-shot method's single evaluation are not);
- **workers**: the fewest GPUs per worker (0.5, 1, 2, 4, ...) whose memory holds a worker, and the Ray
  workers that ``gpus`` GPUs then give.
"""
from __future__ import annotations

import math

from ..errors import UserError
from ..prune.kinds import RECONSTRUCT_CACHE_MB

__all__ = ["make_plan", "calib_shape", "MFU"]

MFU = 0.35  # default model-FLOPs utilisation of a wall-time estimate (forward-only, batch 1, long windows)
GIB = 2 ** 30


def calib_shape(cfg) -> tuple[int, int]:
    """``(samples, seqlen)`` of the calibration set ``cfg`` builds (``ccds``: clusters x samples per cluster)."""
    c = cfg.calibration
    if c.calib_from:
        raise UserError("plan: --calib-from is not supported (give the calibration options it was built with)")
    n = c.nsamples if c.sampling == "random" else c.clusters * c.samples_per_cluster
    return int(n), int(c.seqlen)


def _shape(lm) -> dict:
    from ..models.slicing import width_linears, width_spec
    from ..models.sublayers import sublayer_params

    cfg, model = lm.model.config, lm.model
    p0 = next(model.parameters())
    attn, mlp = sublayer_params(lm.adapter, model)
    blocks = lm.adapter.get_blocks(model)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * cfg.hidden_size
    proj = sum(m.weight.numel() for b in blocks for m in width_linears(lm.adapter, b).values())
    lin = width_linears(lm.adapter, blocks[0])
    return {"n_layers": len(blocks), "hidden": int(cfg.hidden_size), "vocab": int(cfg.vocab_size),
            "intermediate": int(inter), "heads": int(cfg.num_attention_heads),
            "params": int(sum(p.numel() for p in model.parameters())), "dtype_bytes": p0.element_size(),
            "attn_params": attn, "mlp_params": mlp, "projection_params": int(proj),
            "o_in": lin["o"].in_features, "down_in": lin["mlp_out"].in_features,
            "widths": width_spec(model, lm.adapter).layers}


def _stages(cfg, n: int, t: int) -> list[tuple[int, int]]:
    from ..runner.problems.common import stage_slices, stage_tokens

    return stage_slices(stage_tokens(cfg), n, t)


def _hessian_passes(cfg, sh: dict, n_tokens: int) -> int:
    """Token-layers of the output-projection Hessians of every block, in chunks that fit --hessian-mb."""
    from ..prune.hessians import hessian_chunk, hessian_token_layers

    chunk = hessian_chunk((sh["o_in"], sh["down_in"]), cfg.execution.hessian_mb)
    return hessian_token_layers(n_tokens, sh["n_layers"], chunk)


def _setup_token_layers(cfg, sh: dict, stages, n_tokens: int) -> dict:
    """Token-layers spent before the first candidate, by what spends them (a fresh run; no cached database)."""
    N, out = sh["n_layers"], {}
    if cfg.space in ("layers", "sublayers"):
        out["dense caches"] = sum(m * t for m, t in stages) * N
    elif cfg.space == "width":
        out["importance"] = n_tokens * N * (3 if cfg.space_options.importance == "taylor" else 1)
        if cfg.space_options.reconstruct == "ls":
            out["reconstruction"] = _hessian_passes(cfg, sh, n_tokens)
    else:
        o = cfg.space_options
        if o.database == "obs":  # one forward per chunk of blocks whose fp64 Hessians fit --hessian-mb
            out["level database"] = _hessian_passes(cfg, sh, n_tokens)
        else:
            out["level database"] = n_tokens * N
        if cfg.fitness.fitness == "kl":
            out["KL targets"] = sum(m * t for m, t in stages) * N
    return out


def _cost_fn(cfg, sh: dict, stages, train: list[int] | None, every: int, acc: dict, lru_bytes: int | None = None):
    """``cost(stage, genome, done=0)`` in token-layers as the space's evaluator counts it, with the LRU's
    bookkeeping (layers / sublayers: a :class:`~evoprune.fitness.prefix_lru.PrefixLRU` of ``lru_bytes``
    split evenly by stage, ``None``: ``--cache-mb``'s; width / levels: the block-prefix LRU and
    continuations from ``done`` leading batches); sums into ``acc[stage]``."""
    from ..finetune.brief import BACKWARD_FACTOR
    from ..fitness.checkpoints import checkpoint
    from ..fitness.prefix_lru import PrefixLRU

    N = sh["n_layers"]
    tokens = [m * t for m, t in stages]
    if cfg.space == "sublayers":
        w = [x for a, m in zip(sh["attn_params"], sh["mlp_params"]) for x in (a / (a + m), m / (a + m))]
    prefixes = _prefixes(cfg, sh, stages, train) if cfg.space in ("width", "levels") else None
    bs = cfg.calibration.batch_size
    if cfg.space in ("layers", "sublayers"):
        mb = cfg.fitness.lru_mb(cfg.space) * 2 ** 20 if lru_bytes is None else lru_bytes
        lrus = [PrefixLRU(mb / len(stages), n * sh["hidden"] * sh["dtype_bytes"]) if mb else None for n in tokens]

    def cost(stage, g, done: int = 0) -> int:
        s = -1 if stage is None else stage
        n = tokens[s]
        if cfg.space in ("layers", "sublayers"):  # as NLLEvaluator._plan / replay: LRU entry, else checkpoint
            n_units = N * (2 if cfg.space == "sublayers" else 1)
            d = tuple(g.dropped) if cfg.space == "layers" else tuple(g.units)
            hit = lrus[s].lookup(n_units, d) if lrus[s] is not None else None
            first = d[0] if d else n_units
            start, lru_from = (hit[0][0], hit[0][0]) if hit is not None else (checkpoint(first, n_units, every), first)
            if lrus[s] is not None:
                lrus[s].insert_run([u for u in range(lru_from, n_units) if u not in d], d, None)
            run = [u for u in range(start, n_units) if u not in d]
            tl = n * len(run) if cfg.space == "layers" else int(round(n * sum(w[u] for u in run)))
        else:
            m, t = stages[s]
            nb = -(-m // bs)
            start, pre = 0, prefixes[s] if g is not None else None
            if pre is not None:
                keys = _block_keys(cfg, sh, g)
                start = pre.lookup(keys, range(done, nb))[0]
                pre.insert(keys, start, range(done, nb), None)
            tl = (m - min(m, done * bs)) * t * (N - start) + (BACKWARD_FACTOR * train[s] * N if train else 0)
        acc[stage] = acc.get(stage, 0) + tl
        return tl

    return cost


def _prefixes(cfg, sh: dict, stages, train) -> list:
    """One block-prefix LRU per stage as :func:`~evoprune.fitness.whole_model.share_prefixes` gives them (the
    stages that are leading batches of the last share its LRU); ``None`` entries without one."""
    from ..fitness.block_prefix import BlockPrefix
    from ..runner.problems.common import batch_prefix

    mb = cfg.fitness.lru_mb(cfg.space, bool(train))
    if not mb:
        return [None] * len(stages)
    last, bs = len(stages) - 1, cfg.calibration.batch_size
    group = [last if s == last or batch_prefix(stages[s], stages[last], bs) is not None else s
             for s in range(len(stages))]
    out = {}
    for g in sorted(set(group)):
        members = [s for s in range(len(stages)) if group[s] == g]
        m, t = stages[members[-1]]
        out[g] = BlockPrefix(sh["n_layers"], mb * len(members) / len(stages) * 2 ** 20,
                             m * t * sh["hidden"] * sh["dtype_bytes"])
    return [out[group[s]] for s in range(len(stages))]


def _block_keys(cfg, sh: dict, g) -> tuple:
    """What each block computes under ``g``, as the evaluator keys it (width: groups and channels kept)."""
    if cfg.space == "levels":
        return tuple(zip(g.attn, g.mlp))
    from ..prune.width_plan import allocate

    out = []
    for lw, r in zip(sh["widths"], g.rates):
        dg, dc = allocate(lw, r)
        out.append((lw.groups - dg, lw.channels - dc))
    return tuple(out)


def _inputs(cfg, sh: dict, train) -> dict:
    """Synthetic one-shot inputs (Block Influence / OWL ratios) for strategies that need ``scores``; whether
    candidates train, for strategies that may train (as :mod:`evoprune.runner.problems.levels` supplies)."""
    if "training" in cfg.requirements:
        return {"trains": bool(train)}
    if "scores" not in cfg.requirements:
        return {}
    N = sh["n_layers"] * (2 if cfg.space == "sublayers" else 1)  # one score per position of the space
    return {"scores": [0.1 + 0.8 * ((7 * i) % N) / N for i in range(N)]}


def _run(cfg, lm, sh, stages, train, every, lru: int | None = None) -> dict:
    """Dry run of ``cfg``'s method: evaluations, token-layers (setup included), FLOPs."""
    from ..runner.problems import PROBLEMS
    from .flops import block_flops, per_token
    from .simulate import dry_run

    n, t = stages[-1]
    setup = _setup_token_layers(cfg, sh, stages, n * t)
    if "operator" in cfg.requirements:
        return {"setup": setup, "simulated": False,
                "note": f"--method {cfg.method} asks an LLM for its candidates: not simulated"}
    acc: dict = {}
    space = PROBLEMS[cfg.space](cfg, lm).space
    from ..runner.problems.common import stage_links

    links = stage_links(stages, cfg.calibration.batch_size) if cfg.space in ("width", "levels") and not train else {}
    r = dry_run(cfg, space, _cost_fn(cfg, sh, stages, train, every, acc, lru),
                stage_tokens=tuple(m * t_ for m, t_ in stages),
                inputs=_inputs(cfg, sh, train), setup=sum(setup.values()), links=links)
    f = per_token(lm)
    flops = sum(m * t_ * sh["n_layers"] * (block_flops(f, t_) + f["head"]) for m, t_ in stages)  # setup forwards
    for stage, tl in acc.items():
        m, t_ = stages[-1 if stage is None else stage]
        flops += tl * block_flops(f, t_) + r["per_stage"]["all" if stage is None else str(stage)] * m * t_ * f["head"]
    return {"setup": setup, "simulated": True, **r, "flops": flops}


def _memory(cfg, sh: dict, stages, train, every: int | None) -> dict:
    """Bytes of one worker by part (see the module docstring); caches with ``every`` (``None``: unresolved)."""
    from ..fitness.checkpoints import checkpoints

    b, H, V, N = sh["dtype_bytes"], sh["hidden"], sh["vocab"], sh["n_layers"]
    bs = cfg.calibration.batch_size
    m, t = stages[-1]
    out = {"weights": sh["params"] * b}
    if cfg.space in ("layers", "sublayers") and every is not None:
        units = N * (2 if cfg.space == "sublayers" else 1)
        per_stage = [len(checkpoints(units, every)) * mi * ti * H * b for mi, ti in stages]
        out["dense caches"] = sum(per_stage)
        if len(stages) > 1:
            out.update({f"dense cache, stage {s}": v for s, v in enumerate(per_stage)})
    if cfg.fitness.fitness == "kl":
        k = cfg.fitness.kl_topk
        per = 4 * V if k is None or k >= V else 12 * k + 4
        out["KL targets"] = sum(mi * (ti - 1) * per for mi, ti in stages)
    out["LRU"] = int(cfg.fitness.lru_mb(cfg.space, bool(train)) * 2 ** 20)
    if cfg.space == "width" and cfg.space_options.reconstruct == "ls":
        o_in, down_in, proj_out = sh["o_in"], sh["down_in"], sh["hidden"]
        out["reconstruction"] = N * (4 * (o_in ** 2 + down_in ** 2) + b * proj_out * (o_in + down_in)) \
            + RECONSTRUCT_CACHE_MB * 2 ** 20
    B = min(bs, m)
    out["activations"] = B * t * (V * (b + 8) + (6 * H + 3 * sh["intermediate"]) * b)
    if cfg.fitness.fitness == "kl":  # the candidate's fp32 log-probabilities, the dense probabilities, the terms
        out["activations"] += B * t * V * 12
    if train:
        tr = cfg.training
        if tr.mode == "full":
            out["training state"] = sh["projection_params"] * (b + b + 8)  # copy + gradient + fp32 AdamW moments
        else:
            out["training state"] = N * 7 * tr.rank * 2 * H * (4 + 4 + 8)  # LoRA A/B: weights, grads, moments
        out["training activations"] = tr.batch_size * t * N * (6 * H + 3 * sh["intermediate"]) * b
    return out


def _placement(cfg, sh, stages, train, gpu_memory: float, gpus: int, n_units: int) -> dict:
    """The fewest GPUs per worker that hold one worker, its ``cache_every``, and the workers ``gpus`` give."""
    from ..fitness.checkpoints import fit_caches

    layer_space = cfg.space in ("layers", "sublayers")
    on_cpu = cfg.execution.cache_device == "cpu"
    fixed = _memory(cfg, sh, stages, train, None)
    entries = [mi * ti * sh["hidden"] * sh["dtype_bytes"] for mi, ti in stages]
    for g in (0.5, 1, 2, 4, 8, 16, 32):
        if g > max(1, gpus):
            break
        cap = g * gpu_memory
        every, lru = 1, fixed["LRU"]
        if layer_space and not on_cpu:
            fit = fit_caches(n_units, entries, int(cap - fixed["weights"]), fixed["LRU"],
                             every=cfg.fitness.cache_every, flexible=cfg.fitness.cache_mb == "auto")
            if fit is None:
                continue
            every, lru = fit
        mem = {**_memory(cfg, sh, stages, train, every), "LRU": lru}
        on_gpu = sum(v for k, v in mem.items() if not k.startswith("dense cache,") and not (on_cpu and k == "dense caches"))
        if on_gpu <= cap:
            workers = int(gpus // g) if g >= 1 else int(gpus * 2)
            return {"gpus_per_worker": g, "workers": max(1, workers), "cache_every": every if layer_space else None,
                    "memory": mem, "per_worker_bytes": on_gpu, "fits": True,
                    "gpus_computing": min(workers, gpus) if g < 1 else workers}
    mem = _memory(cfg, sh, stages, train, 1 if layer_space else None)
    return {"gpus_per_worker": None, "workers": 0, "cache_every": None, "memory": mem, "fits": False,
            "per_worker_bytes": sum(v for k, v in mem.items() if not k.startswith("dense cache,")), "gpus_computing": 0}


def make_plan(cfg, lm, *, tflops: float, gpus: int, gpu_memory_gib: float = 80.0, mfu: float = MFU) -> dict:
    """The plan of search ``cfg`` on model ``lm`` (on ``meta``) with ``gpus`` GPUs of ``gpu_memory_gib`` GiB and
    ``tflops`` peak TFLOP/s each (see the module docstring). JSON-serialisable."""
    from ..runner.problems.levels import train_tokens

    if not tflops > 0 or gpus < 1 or not gpu_memory_gib > 0 or not 0 < mfu <= 1:
        raise UserError("plan needs --tflops > 0, --gpus >= 1, --gpu-memory > 0 and 0 < --mfu <= 1")
    sh = _shape(lm)
    n, t = calib_shape(cfg)
    stages = _stages(cfg, n, t)
    train = train_tokens(cfg, n, t) if cfg.space == "levels" else None
    n_units = sh["n_layers"] * (2 if cfg.space == "sublayers" else 1)
    place = _placement(cfg, sh, stages, train, gpu_memory_gib * GIB, gpus, n_units)
    every, lru = place["cache_every"] or 1, place["memory"]["LRU"]
    per_candidate = {str(s): _cost_fn(cfg, sh, stages, train, every, {}, lru)(s if len(stages) > 1 else None,
                                                                          _worst(cfg, lm)) for s in range(len(stages))}
    run = _run(cfg, lm, sh, stages, train, every, lru)
    from .flops import block_flops, per_token

    f = per_token(lm)
    flops_candidate = {s: tl * block_flops(f, stages[int(s)][1]) + stages[int(s)][0] * stages[int(s)][1] * f["head"]
                       for s, tl in per_candidate.items()}
    out = {"model": {"n_layers": sh["n_layers"], "hidden": sh["hidden"], "vocab": sh["vocab"], "params": sh["params"],
                     "dtype": str(cfg.model.dtype)},
           "search": {"space": cfg.space, "method": cfg.method, "calibration": [n, t], "stages": stages},
           "placement": place, "token_layers": {"per_candidate_max": per_candidate, "run": run},
           "flops_per_candidate_max": flops_candidate}
    if cfg.space == "layers" and cfg.method != "sleb":
        out["sleb"] = _run(_as_sleb(cfg), lm, sh, [(n, t)], None, every, lru)
    eff = max(1, place["gpus_computing"]) * tflops * 1e12 * mfu
    out["time"] = {"tflops": tflops, "mfu": mfu, "gpus": gpus,
                   "run_s": run.get("flops", math.nan) / eff,
                   "sleb_s": out["sleb"]["flops"] / eff if "sleb" in out else None}
    return out


def _worst(cfg, lm):
    """The costliest candidate of one stage: the first block dropped (everything after it runs)."""
    from ..runner.problems import PROBLEMS

    space = PROBLEMS[cfg.space](cfg, lm).space
    if cfg.space == "layers":
        from ..spaces import DropPattern

        return DropPattern(space.n_layers, tuple(range(space.k)))
    if cfg.space == "sublayers":
        from ..spaces import SublayerPattern

        return SublayerPattern(space.n_layers, (0,), ())
    return None


def _as_sleb(cfg):
    """``cfg`` with ``--method sleb`` (its own defaults), for the reference row of a layer plan."""
    from ..runner.config import SearchConfig

    d = {k: v for k, v in cfg.to_dict().items() if k not in ("method_options", "operator", "training")}
    return SearchConfig.from_dict({**d, "method": "sleb"})
