"""Fitness of a drop pattern: mean calibration NLL, naive or from cached dense hidden states.

Owns
- :class:`Evaluation`, what one fitness evaluation returns (loss + cost);
- :class:`NLLEvaluator`, which scores drop patterns on a
  :class:`~evoprune.data.calibration.CalibSet`, from the dense hidden states
  of :func:`evoprune.fitness.dense.dense_states`.

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..data.calibration import CalibSet
from ..evaluate.perplexity import window_nll
from ..models.hooks import hidden_arg, hooked, model_device, with_hidden
from ..models.loading import LoadedModel
from ..prune.block_influence import block_influence
from ..spaces import DropPattern, SublayerPattern
from .dense import batches, dense_states, no_blocks
from .kl import KLTarget, kl_sum
from .prefix_lru import PrefixLRU, prefix_key

__all__ = ["Evaluation", "NLLEvaluator", "METRICS"]

METRICS = ("nll", "kl")


# -- evaluation ---------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluation:
    """Result of scoring one pattern.

    - ``loss``: mean NLL (or KL to the dense model, ``metric="kl"``), nats per predicted token;
    - ``tokens``: predicted tokens, ``n_samples * (seqlen - 1)``;
    - ``token_layers``: input tokens x decoder blocks run (the prefix cache's setup not included);
    - ``batch_losses``: the loss total (nats) of each calibration batch scored, in order;
    - ``complete``: ``False`` when a :class:`~evoprune.fitness.racing.Race` stopped it early: then
      ``loss`` is the mean over the batches scored (``len(batch_losses)`` of them) and ``tokens``,
      ``token_layers`` count only those.
    """

    loss: float
    tokens: int
    token_layers: int
    batch_losses: tuple[float, ...] = ()
    complete: bool = True


class NLLEvaluator:
    """Fitness (mean next-token NLL, or KL to the dense model) of ``lm`` with a pattern dropped, on ``calib``.

    ``evaluate(pattern)`` returns an :class:`Evaluation`. Modes:

    - ``prefix_cache=False`` (naive): every batch runs through all kept blocks;
      ``token_layers = n_samples * seqlen * len(pattern.kept)``.
    - ``prefix_cache=True``: the first :meth:`evaluate` (or :meth:`prepare`) runs
      the dense model once and caches every block's input hidden state, costing
      :attr:`dense_token_layers`, reported as :attr:`setup_token_layers`. A
      pattern whose first dropped block is ``f`` then runs only its kept blocks
      ``>= f``: ``token_layers = n_samples * seqlen * (len(pattern.kept) - f)``
      (0 for the dense pattern). Same loss as naive (bitwise on CPU).
    - ``cache_mb > 0`` (needs ``prefix_cache``): additionally a
      :class:`~evoprune.fitness.prefix_lru.PrefixLRU` of at most ``cache_mb``
      MiB keeps the hidden states entering every block a candidate ran, keyed by
      (position, dropped blocks below it); a later candidate with the same
      dropped blocks below position ``j`` starts at the deepest such ``j``:
      ``token_layers = n_tokens * #(kept blocks >= j)``. Same loss as naive.
      :meth:`replay` applies an evaluation's bookkeeping without computing
      and returns its token-layers (resume, distributed drivers); ghost
      entries it leaves are computed on a hit, uncounted.

    ``metric="kl"``: the fitness is the mean ``KL(dense || candidate)`` of the
    next-token distributions (see :mod:`evoprune.fitness.kl`; ``kl_topk`` bounds
    memory). The dense logits come from the same dense forward that builds the
    prefix cache (one dense forward in naive mode, counted the same way).

    Prefix cache memory: ``(n_layers + 1) * n_tokens * hidden * bytes`` on the model device (SmolLM2-135M,
    4 x 512 fp32 tokens: 146 MB; a 7B model, 5 x 2048 tokens: 5.5 GB); ``prefix_cache=False`` if it does not fit.

    The model is used in place (zero-copy drops, hooks) and always restored;
    don't run it concurrently from elsewhere while an evaluation is in progress.
    ``n_evaluations`` and ``spent_token_layers`` (setup + all evaluations) are
    running totals.
    """

    def __init__(self, lm: LoadedModel, calib: CalibSet, *, batch_size: int = 1, prefix_cache: bool = True,
                 progress: bool = False, metric: str = "nll", kl_topk: int | None = None,
                 cache_mb: float = 0.0, sublayers: bool = False) -> None:
        if calib.seqlen < 2:
            raise ValueError(f"calibration samples need >= 2 tokens to predict one, got seqlen {calib.seqlen}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if kl_topk is not None and int(kl_topk) < 1:
            raise ValueError(f"kl_topk must be >= 1, got {kl_topk}")
        if cache_mb and not prefix_cache:
            raise ValueError("cache_mb needs prefix_cache=True")
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
        emb = lm.model.get_input_embeddings().weight
        entry = calib.n_tokens * emb.shape[1] * emb.element_size()
        self.lru = PrefixLRU(float(cache_mb) * 2 ** 20, entry) if cache_mb else None

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
        for batch in self._bar(dense_states(self.lm, self.calib, self.batch_size, sublayers=self.sublayers),
                               "caching hidden states"):
            if need_cache:
                cache.append(batch.states)
            if need_kl:
                targets.append(KLTarget.from_logits(batch.logits, self.kl_topk))
        if need_cache:
            self._cache = cache
        if need_kl:
            self._targets = targets
        self._setup += self.dense_token_layers
        self.spent_token_layers += self.dense_token_layers

    def _hidden_at(self, unit: int, batch_index: int) -> torch.Tensor:
        """Dense hidden state entering position ``unit`` (``n_units``: final-norm input) for one batch,
        ``[B, T, hidden]``."""
        assert self._cache is not None
        return self._cache[batch_index][unit]

    def block_influence(self) -> list[float]:
        """ShortGPT Block Influence (:func:`evoprune.prune.block_influence.block_influence`) of every block (of
        every sub-layer with ``sublayers``), from the cached dense states: no forward beyond the cache's."""
        self.prepare()
        if self._cache is None:
            raise RuntimeError("block_influence needs prefix_cache=True")
        return block_influence(self._cache)

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

    def _plan(self, dropped: tuple[int, ...]) -> tuple[int, object]:
        """``(start, lru_hit)`` for these dropped positions: the deepest cached start (LRU bookkeeping applied)."""
        if not self.prefix_cache:
            return 0, None
        hit = self.lru.lookup(self.n_units, dropped) if self.lru is not None else None
        first = dropped[0] if dropped else self.n_units
        return (first if hit is None else hit[0][0]), hit

    def _run_units(self, dropped, start: int) -> list[int]:
        d = set(dropped)
        return [u for u in range(start, self.n_units) if u not in d]

    def _lru_insert(self, dropped: tuple[int, ...], start: int, states: dict[int, list] | None) -> None:
        if self.lru is None:
            return
        run = self._run_units(dropped, start)
        for prev, j in zip(run, run[1:]):
            value = None if states is None else states[j]
            # the state entering kept position j also enters every dropped position between prev and j
            for pos in [d for d in dropped if prev < d < j] + [j]:
                self.lru.insert(prefix_key(pos, dropped), value)

    def replay(self, pattern, batches: int | None = None) -> int:
        """Apply :meth:`evaluate`'s cache bookkeeping for ``pattern`` without computing anything.

        Returns the ``token_layers`` that :meth:`evaluate` would report for
        ``pattern`` at this point (the LRU bookkeeping does not depend on the
        tensors). Used on resume and by a driver whose workers evaluate
        (:mod:`evoprune.distributed`): replaying candidates in the sequential
        order gives the sequential run's token-layers. ``batches``: the batches a
        raced evaluation scored before it stopped (``None``: it completed).
        """
        dropped = self._units(pattern)
        start, _ = self._plan(dropped)
        if batches is None or batches >= len(self.batches):
            self._lru_insert(dropped, start, None)
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

    def evaluate(self, pattern, race=None) -> Evaluation:
        """Score ``pattern`` (validated against the model; :class:`UserError` if it does not fit).

        ``race``: a :class:`~evoprune.fitness.racing.Race` that may stop it after a batch (then the
        result is partial, ``complete=False``, and nothing enters the LRU)."""
        dropped = self._units(pattern)
        self.prepare()
        start, hit = self._plan(dropped)
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
        capture = self._run_units(dropped, start)[1:] if self.lru is not None else []
        ev, states = self._run_from(dropped, start, source, capture, race)
        if ev.complete:
            self._lru_insert(dropped, start, states)
        self.n_evaluations += 1
        self.spent_token_layers += ev.token_layers
        return ev

    def _materialize(self, key) -> list[torch.Tensor]:
        """Per-batch hidden states entering position ``j`` with ``prefix`` dropped below it."""
        j, prefix = key
        f = prefix[0]
        dropped = tuple(prefix) + tuple(range(j, self.n_units))
        _, states = self._run_from(dropped, f, lambda b: self._hidden_at(f, b), [self.n_units])
        return states[self.n_units]

    @torch.no_grad()
    def _run_from(self, dropped: tuple[int, ...], start: int, source: Callable[[int], torch.Tensor] | None,
                  capture: list[int] = (), race=None) -> tuple[Evaluation, dict[int, list[torch.Tensor]]]:
        """Fitness with positions ``dropped`` removed, running only the kept positions ``>= start``.

        ``source(batch_index)`` gives the hidden state entering position ``start``
        under the pattern (the output of its kept positions ``< start``), ``[B, T,
        hidden]``; ``None`` only with ``start == 0`` (the embeddings feed position 0).
        ``capture``: positions that run (or ``n_units``, the final-norm input) whose
        entering hidden states are returned per batch. ``race``: may stop after a batch.
        """
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
        current = [0]
        captured: dict[int, list[torch.Tensor]] = {j: [] for j in capture}

        def feed(module, args, kwargs):
            # clone: a block that updated its input in place must not corrupt the cache
            return with_hidden(args, kwargs, source(current[0]).clone())

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
        total, shape, parts = 0.0, [None], []
        with scope, hooked(hooks, pre=True, with_kwargs=True):
            for b, (s, e) in enumerate(self._bar(self.batches, "eval")):
                current[0] = b
                ids = self.calib.input_ids[s:e].to(device)
                shape[0] = tuple(ids.shape)
                logits = model(input_ids=ids, use_cache=False).logits
                part = kl_sum(self._targets[b], logits) if self.metric == "kl" else float(window_nll(logits, ids).sum())
                total += part
                parts.append(part)
                if race is not None and race.stop(b + 1, total):
                    break
        if len(parts) < len(self.batches):
            tokens = sum(self.batch_tokens[: len(parts)])
            return Evaluation(loss=total / tokens, tokens=tokens, token_layers=self._cost(run, len(parts)),
                              batch_losses=tuple(parts), complete=False), {}
        ev = Evaluation(loss=total / self.tokens, tokens=self.tokens, token_layers=self._cost(run),
                        batch_losses=tuple(parts))
        return ev, captured

    def _bar(self, it, desc: str):
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, total=len(self.batches), unit="batch", leave=False) if self.progress else it
