"""Fitness of a drop pattern: mean calibration NLL, naive or from cached dense hidden states.

Owns :class:`NLLEvaluator`, which scores drop patterns on a :class:`~evoprune.data.calibration.CalibSet`
from the dense hidden states of :func:`evoprune.fitness.dense.dense_states` (it returns an
:class:`~evoprune.fitness.evaluation.Evaluation`).

Cost unit: *token-layers* = input tokens x decoder blocks actually run. Only
decoder blocks count (embedding, final norm and LM head are not), so a naive
forward of an ``n_layers``-block model over the calibration set costs
``n_samples * seqlen * n_kept`` token-layers.

Prefix cache (``prefix_cache=True``): the dense model is run once over the
calibration set and the input hidden state ``H_i`` of every block ``i`` (plus
``H_N``, the final-norm input) is kept. Blocks before a candidate's first dropped
block ``f`` are those of the dense model, so the candidate's hidden state entering
its first kept block after ``f`` is exactly ``H_f``; only the kept blocks
``>= f`` are run. No HF internals are touched: the model runs inside
``adapter.dropped(model, pattern ∪ {0..f-1})`` (so rotary embeddings, masks and
per-layer config are built by the model itself for the blocks that run) and a
forward pre-hook swaps ``H_f`` in as the ``hidden_states`` input of the first
block that runs (or of the final norm when none runs). The losses equal the
naive ones bit for bit on CPU as long as the cache was built with the same
batching, which the evaluator guarantees.

Sub-layers (``sublayers=True``, for :class:`~evoprune.spaces.SublayerPattern`): the positions are
the ``2N`` sub-layers in forward order (attention of block ``i`` = ``2i``, its MLP = ``2i + 1``) and
the dense cache also holds the residual stream after every block's attention (the input of
``adapter.residual_site``). A candidate whose first dropped sub-layer is ``u`` starts there: the
state entering ``u`` is fed at the input of the first block that runs, whose earlier sub-layers are
removed (``adapter.skipped``). A sub-layer's token-layers are its share of its block's matmul
FLOPs (attention / MLP parameters over the block's; SmolLM2-135M: 0.25 / 0.75), so a whole block
still counts 1; an evaluation's total is rounded to an integer.

Sparse checkpoints (``cache_every=j > 1``, :mod:`evoprune.fitness.checkpoints`): a candidate whose first
dropped position is ``f`` starts at the kept state ``c = j * (f // j)`` and recomputes the dense
positions ``c .. f-1``, counted: ``token_layers`` grows by ``n_tokens x (f - c)`` (sub-layers: their
weights); the losses and the LRU's bookkeeping are those of the full cache. ``cache_device``: where the
cached states live (default: the model's; ``cpu`` beside a CUDA model: pinned, copied per batch).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.calibration import CalibSet
from ..evaluate.perplexity import window_nll
from ..models.hooks import hidden_arg, hooked, model_device, with_hidden
from ..models.loading import LoadedModel
from ..prune.block_influence import block_influence
from ..spaces import DropPattern, SublayerPattern
from .checkpoints import checkpoint, checkpoints, keep_states
from .dense import batches, dense_states, no_blocks
from .evaluation import Evaluation
from .kl import KLTarget, kl_sum
from .prefix_lru import PrefixLRU

__all__ = ["Evaluation", "NLLEvaluator", "METRICS"]

METRICS = ("nll", "kl")
_NO_DONE = "NLLEvaluator does not continue from a lower stage's batches (done must be empty)"


class NLLEvaluator:
    """Fitness (mean next-token NLL, or KL to the dense model) of ``lm`` with a pattern dropped, on ``calib``.

    ``evaluate(pattern)`` returns an :class:`Evaluation`. Modes:

    - ``prefix_cache=False`` (naive): every batch runs through all kept blocks;
      ``token_layers = n_samples * seqlen * len(pattern.kept)``.
    - ``prefix_cache=True``: the first :meth:`evaluate` (or :meth:`prepare`) runs the dense model once and
      caches every block's input hidden state, costing :attr:`dense_token_layers`, reported as
      :attr:`setup_token_layers`. A pattern whose first dropped block is ``f`` then runs only its kept
      blocks ``>= f``: ``token_layers = n_samples * seqlen * (len(pattern.kept) - f)`` (0 for the dense
      pattern). Same loss as naive (bitwise on CPU).
    - ``cache_mb > 0`` (needs ``prefix_cache``): additionally a :class:`~evoprune.fitness.prefix_lru.PrefixLRU`
      of at most ``cache_mb`` MiB keeps the hidden states entering every block a candidate ran, keyed by
      (position, dropped blocks below it); a later candidate with the same dropped blocks below position
      ``j`` starts at the deepest such ``j``: ``token_layers = n_tokens * #(kept blocks >= j)``. Same loss
      as naive. :meth:`replay` applies an evaluation's bookkeeping without computing and returns its
      token-layers (resume, distributed drivers); ghost entries it leaves are computed on a hit, uncounted.

    ``metric="kl"``: the fitness is the mean ``KL(dense || candidate)`` of the
    next-token distributions (see :mod:`evoprune.fitness.kl`; ``kl_topk`` bounds
    memory). The dense logits come from the same dense forward that builds the
    prefix cache (one dense forward in naive mode, counted the same way).

    Prefix cache memory: :attr:`cache_bytes` (SmolLM2-135M, 4 x 512 fp32 tokens: 146 MB; a 7B model,
    5 x 2048 tokens: 5.5 GB); ``cache_every``/``cache_device`` (or ``prefix_cache=False``) if it does not fit.

    The model is used in place (zero-copy drops, hooks) and always restored; don't run it concurrently from
    elsewhere while an evaluation is in progress. ``n_evaluations`` and ``spent_token_layers`` (setup + all
    evaluations) are running totals.
    """

    def __init__(self, lm: LoadedModel, calib: CalibSet, *, batch_size: int = 1, prefix_cache: bool = True,
                 progress: bool = False, metric: str = "nll", kl_topk: int | None = None,
                 cache_mb: float = 0.0, sublayers: bool = False, cache_every: int = 1,
                 cache_device: str | None = None) -> None:
        if calib.seqlen < 2:
            raise ValueError(f"calibration samples need >= 2 tokens to predict one, got seqlen {calib.seqlen}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if kl_topk is not None and int(kl_topk) < 1:
            raise ValueError(f"kl_topk must be >= 1, got {kl_topk}")
        if cache_mb and not prefix_cache:
            raise ValueError("cache_mb needs prefix_cache=True")
        if isinstance(cache_every, bool) or int(cache_every) < 1:
            raise ValueError(f"cache_every must be >= 1, got {cache_every}")
        self.lm = lm
        self.calib = calib
        self.batch_size = int(batch_size)
        self.batches = batches(calib.n_samples, batch_size)
        self.prefix_cache = bool(prefix_cache)
        self.progress = bool(progress)
        self.metric = metric
        self.kl_topk = None if kl_topk is None else int(kl_topk)
        self.n_layers = lm.n_layers
        self.sublayers = bool(sublayers)
        self.per_block = 2 if self.sublayers else 1
        self.n_units = self.per_block * self.n_layers
        self.cache_every = int(cache_every)
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        if self.sublayers:
            from ..models.sublayers import check_sublayers, sublayer_params

            check_sublayers(lm.model)
            attn, mlp = sublayer_params(lm.adapter, lm.model)
            self.weights = tuple(w for a, m in zip(attn, mlp) for w in (a / (a + m), m / (a + m)))
        else:
            self.weights = (1.0,) * self.n_layers
        self.n_evaluations = 0
        self.spent_token_layers = 0
        # _cache[b][u]: hidden state entering position u (u == n_units: final-norm input) for batch b
        self._cache: list[list[torch.Tensor]] | None = None
        self._targets: list[KLTarget] | None = None
        self._setup = 0
        self._bi: list[float] | None = None  # Block Influence, kept from the dense forward when states are thinned
        emb = lm.model.get_input_embeddings().weight
        self.lru_entry_bytes = calib.n_tokens * emb.shape[1] * emb.element_size()  # one state of every token
        self.lru = PrefixLRU(float(cache_mb) * 2 ** 20, self.lru_entry_bytes) if cache_mb else None

    # -- sizes ---------------------------------------------------------------
    @property
    def tokens(self) -> int:
        """Predicted tokens per evaluation, ``n_samples * (seqlen - 1)``."""
        return self.calib.n_samples * (self.calib.seqlen - 1)

    @property
    def dense_token_layers(self) -> int:
        """Cost of one naive dense forward: ``n_samples * seqlen * n_layers``."""
        return self.calib.n_tokens * self.n_layers

    @property
    def setup_token_layers(self) -> int:
        """Token-layers spent on the dense forward (prefix cache and/or KL targets); 0 until it ran."""
        return self._setup

    def checkpoint(self, first: int) -> int:
        """The cached position a candidate whose first dropped position is ``first`` starts from."""
        return checkpoint(first, self.n_units, self.cache_every)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the dense prefix cache: ``len(checkpoints) x n_tokens x hidden x element size``."""
        return len(checkpoints(self.n_units, self.cache_every)) * self.lru_entry_bytes

    # -- prefix cache --------------------------------------------------------
    def prepare(self) -> None:
        """Run the dense forward now if a prefix cache or KL targets need it (otherwise the first evaluation does)."""
        need_cache = self.prefix_cache and self._cache is None
        need_kl = self.metric == "kl" and self._targets is None
        if not (need_cache or need_kl):
            return
        if self.lm.adapter.n_layers(self.lm.model) != self.n_layers:
            raise RuntimeError("the model's block count changed since the evaluator was built")
        cache, targets = [], []

        def stream():
            for batch in self._bar(dense_states(self.lm, self.calib, self.batch_size, sublayers=self.sublayers),
                                   "caching hidden states"):
                if need_cache:
                    cache.append(keep_states(batch.states, self.n_units, self.cache_every, self.cache_device))
                if need_kl:
                    targets.append(KLTarget.from_logits(batch.logits, self.kl_topk))
                yield batch.states

        thinned = need_cache and self.cache_every > 1  # BI needs every state: take it before they are thinned
        bi = block_influence(stream()) if thinned else [None for _ in stream()]
        self._bi = bi if thinned else self._bi
        if need_cache:
            self._cache = cache
        if need_kl:
            self._targets = targets
        self._setup += self.dense_token_layers
        self.spent_token_layers += self.dense_token_layers

    def _hidden_at(self, unit: int, batch_index: int) -> torch.Tensor:
        """Dense state entering position ``unit`` (``n_units``: the final-norm input) of one batch, ``[B, T, hidden]``."""
        assert self._cache is not None and self._cache[batch_index][unit] is not None
        return self._cache[batch_index][unit]

    def block_influence(self) -> list[float]:
        """ShortGPT Block Influence (:func:`evoprune.prune.block_influence.block_influence`) of every block (of
        every sub-layer with ``sublayers``), from the cached dense states: no forward beyond the cache's."""
        self.prepare()
        if self._cache is None:
            raise RuntimeError("block_influence needs prefix_cache=True")
        return list(self._bi) if self._bi is not None else block_influence(self._cache)

    # -- evaluation ----------------------------------------------------------
    def _units(self, pattern) -> tuple[int, ...]:
        """The dropped positions of ``pattern`` (validated against the model; :class:`UserError` if it does not fit)."""
        if self.sublayers:
            if not isinstance(pattern, SublayerPattern) or pattern.n_layers != self.n_layers:
                from ..errors import UserError

                raise UserError(f"not a sub-layer pattern of this {self.n_layers}-block model: {pattern}")
            return pattern.units
        return self.lm.adapter.pattern(self.lm.model, pattern).dropped

    def _cost(self, run, batches: int | None = None) -> int:
        """Token-layers of running the positions ``run`` over the calibration set (its first ``batches`` batches)."""
        n = self.calib.n_tokens if batches is None else self.batch_input_tokens(batches)
        if not self.sublayers:
            return n * len(run)
        return int(round(n * sum(self.weights[u] for u in run)))

    def batch_input_tokens(self, batches: int) -> int:
        """Input tokens of the first ``batches`` calibration batches."""
        return sum(e - s for s, e in self.batches[:batches]) * self.calib.seqlen

    @property
    def batch_tokens(self) -> tuple[int, ...]:
        """Predicted tokens of each calibration batch (what a :class:`~evoprune.fitness.racing.Race` weighs by)."""
        return tuple((e - s) * (self.calib.seqlen - 1) for s, e in self.batches)

    def _plan(self, dropped: tuple[int, ...]) -> tuple[int, int, object]:
        """``(start, lru_from, lru_hit)`` for these dropped positions (LRU bookkeeping applied): where the
        forward starts (an LRU entry, or the checkpoint at or before the first dropped position) and where
        the positions the LRU sees start (the entry, or the first dropped position)."""
        if not self.prefix_cache:
            return 0, 0, None
        hit = self.lru.lookup(self.n_units, dropped) if self.lru is not None else None
        if hit is not None:
            return hit[0][0], hit[0][0], hit
        first = dropped[0] if dropped else self.n_units
        return self.checkpoint(first), first, None

    def _run_units(self, dropped, start: int) -> list[int]:
        d = set(dropped)
        return [u for u in range(start, self.n_units) if u not in d]

    def _lru_insert(self, dropped: tuple[int, ...], start: int, states: dict[int, list] | None) -> None:
        if self.lru is not None:
            self.lru.insert_run(self._run_units(dropped, start), dropped, states)

    def replay(self, pattern, batches: int | None = None, done: int = 0) -> int:
        """Apply :meth:`evaluate`'s cache bookkeeping for ``pattern`` without computing anything; returns the
        ``token_layers`` :meth:`evaluate` would report now (the bookkeeping does not depend on the tensors).
        Used on resume and by a driver whose workers evaluate (:mod:`evoprune.distributed`): replaying in the
        sequential order gives the sequential run's token-layers. ``batches``: the batches a raced evaluation
        scored before it stopped (``None``: it completed); ``done``: as :meth:`evaluate`'s, always 0 here."""
        if done:  # the layer spaces' stages are never linked
            raise ValueError(_NO_DONE)
        dropped = self._units(pattern)
        start, lru_from, _ = self._plan(dropped)
        if batches is None or batches >= len(self.batches):
            self._lru_insert(dropped, lru_from, None)
            batches = None
        return self._cost(self._run_units(dropped, start), batches)

    def release(self) -> None:
        """Free the dense prefix cache, KL targets and LRU tensors; the LRU bookkeeping stays.

        For a driver that only calls :meth:`replay` (its workers evaluate). A later
        :meth:`evaluate` rebuilds what it needs; that dense forward is counted
        again in :attr:`setup_token_layers`.
        """
        self._cache = None
        self._targets = None
        if self.lru is not None:
            for key in self.lru.keys():
                self.lru.set(key, None)

    def evaluate(self, pattern, race=None, done=()) -> Evaluation:
        """Score ``pattern`` (validated against the model; :class:`UserError` if it does not fit).

        ``race``: a :class:`~evoprune.fitness.racing.Race` that may stop it after a batch (then the result is
        partial, ``complete=False``, nothing enters the LRU). ``done``: the continuation argument, empty here."""
        if done:  # the layer spaces' stages are never linked
            raise ValueError(_NO_DONE)
        dropped = self._units(pattern)
        self.prepare()
        start, lru_from, hit = self._plan(dropped)
        if not self.prefix_cache:
            source = None
        elif hit is None:
            source = lambda b, f=start: self._hidden_at(f, b)  # noqa: E731
        else:
            key, states = hit
            if states is None:  # a ghost left by replay: compute it now (not counted, like the resumed setup)
                states = self._materialize(key)
                self.lru.set(key, states)
            source = lambda b, s=states: s[b]  # noqa: E731
        capture = self._run_units(dropped, lru_from)[1:] if self.lru is not None else []
        ev, states = self._run_from(dropped, start, source, capture, race)
        if ev.complete:
            self._lru_insert(dropped, lru_from, states)
        self.n_evaluations += 1
        self.spent_token_layers += ev.token_layers
        return ev

    def _materialize(self, key) -> list[torch.Tensor]:
        """Per-batch hidden states entering position ``j`` with ``prefix`` dropped below it."""
        j, prefix = key
        c = self.checkpoint(prefix[0])
        dropped = tuple(prefix) + tuple(range(j, self.n_units))
        _, states = self._run_from(dropped, c, lambda b: self._hidden_at(c, b), [self.n_units])
        return states[self.n_units]

    @torch.no_grad()
    def _run_from(self, dropped: tuple[int, ...], start: int, source: Callable[[int], torch.Tensor] | None,
                  capture: list[int] = (), race=None, done: Sequence[float] = ()
                  ) -> tuple[Evaluation, dict[int, list[torch.Tensor]]]:
        """Fitness with positions ``dropped`` removed, running only the kept positions ``>= start``.

        ``source(batch_index)`` gives the hidden state entering position ``start``
        under the pattern (the output of its kept positions ``< start``), ``[B, T,
        hidden]``; ``None`` only with ``start == 0`` (the embeddings feed position 0).
        ``capture``: positions that run (or ``n_units``, the final-norm input) whose
        entering hidden states are returned per batch (``None`` for batches not run).
        ``race``: may stop after a batch (or before any). ``done``: loss totals of the
        first batches, already scored: not run again, summed in the same order, not in
        ``token_layers``."""
        lm, model, adapter = self.lm, self.lm.model, self.lm.adapter
        if source is None and start != 0:
            raise ValueError("a start position > 0 needs a hidden-state source")
        run = self._run_units(dropped, start)
        blocks = adapter.get_blocks(model)
        if not run:
            target, scope = adapter.final_norm(model), no_blocks(lm)
        elif self.sublayers:
            ran = set(run)
            target = blocks[run[0] // 2]
            scope = adapter.skipped(model, attention=[i for i in range(self.n_layers) if 2 * i not in ran],
                                    mlp=[i for i in range(self.n_layers) if 2 * i + 1 not in ran])
        else:
            target = blocks[run[0]]
            scope = adapter.dropped(model, DropPattern(self.n_layers, tuple(sorted(set(range(self.n_layers)) - set(run)))))
        current, first = [0], len(done)
        captured: dict[int, list[torch.Tensor]] = {j: [None] * first for j in capture}

        def feed(module, args, kwargs):
            # clone: a block that updated its input in place must not corrupt the cache; the copy goes to the
            # device of the input it replaces (a split model's block, or a GPU beside a CPU cache)
            h, where = source(current[0]), hidden_arg(args, kwargs).device
            return with_hidden(args, kwargs, h.clone() if h.device == where else h.to(where, non_blocking=True))

        def grab(j: int) -> Callable:
            def hook(module, args, kwargs):
                h = hidden_arg(args, kwargs)
                if h.dim() == 2:  # a residual site that sees the stream flattened (OPT)
                    h = h.view(*shape[0], -1)
                captured[j].append(h.detach().clone())

            return hook

        def site(j: int):
            if j == self.n_units:
                return adapter.final_norm(model)
            if not self.sublayers:
                return blocks[j]
            return blocks[j // 2] if j % 2 == 0 else adapter.residual_site(blocks[j // 2])

        hooks = [(target, feed)] if source is not None else []
        hooks += [(site(j), grab(j)) for j in capture]
        device = model_device(model)
        total, shape, parts = sum(done, 0.0), [None], list(done)  # sum: left to right, as the loop adds
        stop = race is not None and 0 < first < len(self.batches) and race.stop(first, total)
        with scope, hooked(hooks, pre=True, with_kwargs=True):
            for b, (s, e) in enumerate(self._bar(self.batches[first:] if not stop else [], "eval"), start=first):
                current[0] = b
                ids = self.calib.input_ids[s:e].to(device)
                shape[0] = tuple(ids.shape)
                logits = model(input_ids=ids, use_cache=False).logits
                part = kl_sum(self._targets[b], logits) if self.metric == "kl" else float(window_nll(logits, ids).sum())
                total += part
                parts.append(part)
                if race is not None and race.stop(b + 1, total):
                    break
        ran, tokens = self._cost(run, len(parts)) - self._cost(run, first), sum(self.batch_tokens[: len(parts)])
        complete = len(parts) == len(self.batches)  # then tokens == self.tokens
        return (Evaluation(loss=total / tokens, tokens=tokens, token_layers=ran, batch_losses=tuple(parts),
                           complete=complete), captured if complete else {})

    def _bar(self, it, desc: str):
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, total=len(self.batches), unit="batch", leave=False) if self.progress else it
