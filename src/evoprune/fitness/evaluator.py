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
from ..spaces import DropPattern
from .dense import batches, dense_states, no_blocks
from .kl import KLTarget, kl_sum
from .prefix_lru import PrefixLRU, prefix_key

__all__ = ["Evaluation", "NLLEvaluator", "METRICS"]

METRICS = ("nll", "kl")


# -- evaluation ---------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluation:
    """Result of scoring one pattern.

    - ``loss``: mean NLL (or KL to the dense model, ``metric="kl"``) in nats per
      predicted token over all calibration samples;
    - ``tokens``: predicted tokens, ``n_samples * (seqlen - 1)``;
    - ``token_layers``: input tokens x decoder blocks actually run for this
      evaluation (the prefix cache's setup cost is not included).
    """

    loss: float
    tokens: int
    token_layers: int


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

    Memory of the prefix cache: ``(n_layers + 1) * n_samples * seqlen * hidden *
    bytes`` on the model device, ``bytes`` = 4 for fp32 models (SmolLM2-135M,
    4 x 512 tokens: 31 * 2048 * 576 * 4 B = 146 MB; a 7B model at 32 x 4096 hidden
    with 5 x 2048 tokens: 5.5 GB). Use ``prefix_cache=False`` when it does not fit.

    The model is used in place (zero-copy drops, hooks) and always restored;
    don't run it concurrently from elsewhere while an evaluation is in progress.
    ``n_evaluations`` and ``spent_token_layers`` (setup + all evaluations) are
    running totals.
    """

    def __init__(self, lm: LoadedModel, calib: CalibSet, *, batch_size: int = 1, prefix_cache: bool = True,
                 progress: bool = False, metric: str = "nll", kl_topk: int | None = None,
                 cache_mb: float = 0.0) -> None:
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
        self.n_evaluations = 0
        self.spent_token_layers = 0
        # _cache[b][i]: input hidden state of block i (i == n_layers: final-norm input) for batch b
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
        for batch in self._bar(dense_states(self.lm, self.calib, self.batch_size), "caching hidden states"):
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

    def _hidden_at(self, block: int, batch_index: int) -> torch.Tensor:
        """Dense input hidden state of ``block`` (``n_layers``: final-norm input) for one batch, ``[B, T, hidden]``."""
        assert self._cache is not None
        return self._cache[batch_index][block]

    def block_influence(self) -> list[float]:
        """ShortGPT Block Influence (:func:`evoprune.prune.block_influence.block_influence`) of every block,
        from the cached dense states: no forward beyond the cache's."""
        self.prepare()
        if self._cache is None:
            raise RuntimeError("block_influence needs prefix_cache=True")
        return block_influence(self._cache)

    # -- evaluation ----------------------------------------------------------
    def _plan(self, pattern: DropPattern) -> tuple[int, object]:
        """``(start, lru_hit)`` for ``pattern``: the deepest cached start position (LRU bookkeeping applied)."""
        if not self.prefix_cache:
            return 0, None
        hit = self.lru.lookup(self.n_layers, pattern.dropped) if self.lru is not None else None
        return (pattern.first_dropped if hit is None else hit[0][0]), hit

    def _lru_insert(self, pattern: DropPattern, start: int, states: dict[int, list] | None) -> None:
        if self.lru is None:
            return
        run = [i for i in pattern.kept if i >= start]
        for prev, j in zip(run, run[1:]):
            value = None if states is None else states[j]
            # the state entering kept block j also enters every dropped position between prev and j
            for pos in [d for d in pattern.dropped if prev < d < j] + [j]:
                self.lru.insert(prefix_key(pos, pattern.dropped), value)

    def replay(self, pattern: DropPattern) -> int:
        """Apply :meth:`evaluate`'s cache bookkeeping for ``pattern`` without computing anything.

        Returns the ``token_layers`` that :meth:`evaluate` would report for
        ``pattern`` at this point (the LRU bookkeeping does not depend on the
        tensors). Used on resume and by a driver whose workers evaluate
        (:mod:`evoprune.distributed`): replaying candidates in the sequential
        order gives the sequential run's token-layers.
        """
        pattern = self.lm.adapter.pattern(self.lm.model, pattern)
        start, _ = self._plan(pattern)
        self._lru_insert(pattern, start, None)
        return self.calib.n_tokens * sum(1 for i in pattern.kept if i >= start)

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

    def evaluate(self, pattern: DropPattern) -> Evaluation:
        """Score ``pattern`` (validated against the model; :class:`UserError` if it does not fit)."""
        pattern = self.lm.adapter.pattern(self.lm.model, pattern)
        self.prepare()
        start, hit = self._plan(pattern)
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
        capture = [i for i in pattern.kept if i >= start][1:] if self.lru is not None else []
        ev, states = self._run_from(pattern, start, source, capture)
        self._lru_insert(pattern, start, states)
        self.n_evaluations += 1
        self.spent_token_layers += ev.token_layers
        return ev

    def _materialize(self, key) -> list[torch.Tensor]:
        """Per-batch hidden states entering position ``j`` with ``prefix`` dropped below it."""
        j, prefix = key
        f = prefix[0]
        p = DropPattern(self.n_layers, tuple(prefix) + tuple(range(j, self.n_layers)))
        _, states = self._run_from(p, f, lambda b: self._hidden_at(f, b), [self.n_layers])
        return states[self.n_layers]

    @torch.no_grad()
    def _run_from(self, pattern: DropPattern, start: int, source: Callable[[int], torch.Tensor] | None,
                  capture: list[int] = ()) -> tuple[Evaluation, dict[int, list[torch.Tensor]]]:
        """Fitness of ``pattern`` running only its kept blocks ``>= start``.

        ``source(batch_index)`` gives the hidden state entering position ``start``
        under ``pattern`` (the output of its kept blocks ``< start``), ``[B, T,
        hidden]``; ``None`` only with ``start == 0`` (the embeddings feed block 0).
        ``capture``: positions (kept blocks that run, or ``n_layers`` for the
        final-norm input) whose input hidden states are returned per batch.
        """
        lm, model, adapter = self.lm, self.lm.model, self.lm.adapter
        if source is None and start != 0:
            raise ValueError("a start block > 0 needs a hidden-state source")
        run = [i for i in pattern.kept if i >= start]
        skipped = tuple(sorted(set(range(self.n_layers)) - set(run)))
        blocks = adapter.get_blocks(model)
        if run:
            target = blocks[run[0]]
            scope = adapter.dropped(model, DropPattern(self.n_layers, skipped))
        else:
            target = adapter.final_norm(model)
            scope = no_blocks(lm)
        current = [0]
        captured: dict[int, list[torch.Tensor]] = {j: [] for j in capture}

        def feed(module, args, kwargs):
            # clone: a block that updated its input in place must not corrupt the cache
            return with_hidden(args, kwargs, source(current[0]).clone())

        def grab(j: int) -> Callable:
            def hook(module, args, kwargs):
                captured[j].append(hidden_arg(args, kwargs).detach().clone())

            return hook

        hooks = [(target, feed)] if source is not None else []
        hooks += [(adapter.final_norm(model) if j == self.n_layers else blocks[j], grab(j)) for j in capture]
        device = model_device(model)
        total = 0.0
        with scope, hooked(hooks, pre=True, with_kwargs=True):
            for b, (s, e) in enumerate(self._bar(self.batches, "eval")):
                current[0] = b
                ids = self.calib.input_ids[s:e].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                if self.metric == "kl":
                    total += kl_sum(self._targets[b], logits)
                else:
                    total += float(window_nll(logits, ids).sum())
        ev = Evaluation(loss=total / self.tokens, tokens=self.tokens, token_layers=self.calib.n_tokens * len(run))
        return ev, captured

    def _bar(self, it, desc: str):
        if not self.progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, total=len(self.batches), unit="batch", leave=False)
