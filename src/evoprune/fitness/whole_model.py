"""Fitness of a width-pruning rate vector: mean calibration NLL (or KL) of the masked model.

Owns :class:`WholeModelEvaluator` (the base of evaluators that edit the whole
model per candidate; :mod:`evoprune.fitness.levels` builds on it too) and
:class:`WidthEvaluator`, the width counterpart of
:class:`~evoprune.fitness.evaluator.NLLEvaluator`: rates -> :class:`WidthPlan`
(:func:`~evoprune.prune.width_plan.plan_widths`) -> the model run inside
:func:`~evoprune.models.slicing.width_masked` by a naive ``NLLEvaluator`` (no
blocks dropped, no prefix cache). The masked model computes what the
physically sliced model computes (up to float summation order), so the loss is
that of the exported model.

Cost: naively every block runs on every token, ``token_layers = n_tokens * n_layers``
per evaluation (a width candidate changes every block it prunes, so there is no
*dense* prefix to reuse). With ``cache_mb`` a :class:`~evoprune.fitness.block_prefix.BlockPrefix`
keeps the hidden states entering the blocks of recent candidates, keyed by what the blocks
before them compute (:meth:`WholeModelEvaluator.block_keys`); a candidate whose first ``j``
blocks equal a cached one's (a mutant of a parent that changed only later blocks) starts at
block ``j``: ``token_layers = n_tokens * (n_layers - j)``, the same loss (bit for bit on CPU).
The importance scores' own dense forward is counted where they are computed
(``WidthImportance.token_layers``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.calibration import CalibSet
from ..models.loading import LoadedModel
from ..models.slicing import width_masked, width_spec
from ..prune.importance import WidthImportance
from ..prune.width_plan import WidthPlan, plan_widths
from ..spaces import DropPattern
from .block_prefix import BlockPrefix
from .evaluator import Evaluation, NLLEvaluator

__all__ = ["WholeModelEvaluator", "WidthEvaluator", "share_prefixes"]


def _place(h: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``h`` on the cache device (pinned when that is the CPU beside CUDA, so copies back overlap)."""
    if h.device == device:
        return h
    h = h.to(device)
    return h.pin_memory() if device.type == "cpu" and torch.cuda.is_available() else h


class WholeModelEvaluator:
    """Base of evaluators that edit the whole model per candidate and score it with a naive
    :class:`~evoprune.fitness.evaluator.NLLEvaluator` (every block on every token, no prefix cache):
    the counters under :class:`NLLEvaluator`'s names, the dense KL targets, no replay state.
    Subclasses implement ``evaluate`` (scoring ``self._dense`` inside their edit, passing the candidate's
    :meth:`block_keys`) and may add ``extra_token_layers`` per evaluation (e.g. training).

    ``cache_mb`` > 0: the shared block-prefix states (see the module docstring) take at most that many
    MiB on ``cache_device`` (default: the model's), thinned by ``cache_every`` (``None``:
    :func:`~evoprune.fitness.block_prefix.auto_every`)."""

    extra_token_layers = 0

    def __init__(self, lm: LoadedModel, calib: CalibSet, *, batch_size: int = 1, metric: str = "nll",
                 kl_topk: int | None = None, progress: bool = False, cache_mb: float = 0.0,
                 cache_every: int | None = None, cache_device: str | None = None) -> None:
        self.lm = lm
        self.calib = calib
        self.n_layers = lm.n_layers
        self._dense = DropPattern(self.n_layers)
        self._nll = NLLEvaluator(lm, calib, batch_size=batch_size, prefix_cache=False, metric=metric,
                                 kl_topk=kl_topk, progress=progress)
        self.n_evaluations = 0
        self._spent = 0
        if not float(cache_mb) >= 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.prefix = BlockPrefix(self.n_layers, float(cache_mb) * 2 ** 20, self._nll.lru_entry_bytes,
                                  cache_every) if cache_mb else None
        self.cache_device = None if cache_device is None else torch.device(cache_device)

    def block_keys(self, genome) -> tuple | None:
        """One hashable key per block saying what the block computes under ``genome`` (equal keys: equal
        outputs from equal inputs); ``None``: no prefix reuse for this candidate."""
        return None

    @property
    def metric(self) -> str:
        return self._nll.metric

    @property
    def tokens(self) -> int:
        """Predicted tokens per evaluation, ``n_samples * (seqlen - 1)``."""
        return self._nll.tokens

    @property
    def dense_token_layers(self) -> int:
        """Cost of one evaluation: every block on every token (``n_samples * seqlen * n_layers``), plus
        :attr:`extra_token_layers`."""
        return self._nll.dense_token_layers + self.extra_token_layers

    @property
    def setup_token_layers(self) -> int:
        """Token-layers of the dense forward for KL targets (0 for ``nll`` or before :meth:`prepare`)."""
        return self._nll.setup_token_layers

    @property
    def spent_token_layers(self) -> int:
        """Setup + all evaluations so far."""
        return self.setup_token_layers + self._spent

    @property
    def batch_tokens(self) -> tuple[int, ...]:
        """Predicted tokens of each calibration batch (see :class:`~evoprune.fitness.racing.Race`)."""
        return self._nll.batch_tokens

    def _cost(self, batches: int | None, start: int = 0, done: int = 0) -> int:
        """Token-layers of an evaluation from block ``start`` that scored batches ``done ..`` up to its first
        ``batches`` (``None``: all). Training (:attr:`extra_token_layers`) runs before any batch is scored,
        so it is always paid in full."""
        n = len(self._nll.batches)
        end = n if batches is None else min(int(batches), n)
        tokens = self._nll.batch_input_tokens(end) - self._nll.batch_input_tokens(min(done, end))
        return tokens * (self.n_layers - start) + self.extra_token_layers

    def extends(self, other) -> int | None:
        """How many leading batches of this evaluator ``other`` scores identically (the same samples,
        batched the same way): a candidate ``other`` scored completely continues here with ``done`` = its
        batch losses. ``None`` when ``other`` is not such a prefix."""
        mine, theirs = getattr(self, "_nll", None), getattr(other, "_nll", None)
        if theirs is None or other is self or type(other) is not type(self):
            return None
        k = len(theirs.batches)
        if k >= len(mine.batches) or tuple(theirs.batches) != tuple(mine.batches[:k]):
            return None
        m = theirs.calib.n_samples
        if other.calib.seqlen != self.calib.seqlen or not torch.equal(other.calib.input_ids, self.calib.input_ids[:m]):
            return None
        return k

    def prepare(self) -> None:
        """Compute the dense KL targets now (``metric="kl"``), from the unedited model; a no-op for ``nll``."""
        self._nll.prepare()

    def _prefix_of(self, keys) -> BlockPrefix | None:
        return self.prefix if keys is not None and self.prefix is not None and self.prefix.active else None

    def _score(self, race=None, keys: tuple | None = None, done: Sequence[float] = ()):
        """The loss of the model as it is now (inside the subclass's edit, whose block keys are ``keys``),
        raced by ``race``, from the deepest cached block prefix; ``done``: loss totals of the first batches,
        already scored (see :meth:`extends`). Counts one evaluation."""
        pre = self._prefix_of(keys)
        first = len(done)
        self._nll.prepare()
        if pre is None:
            e, _ = self._nll._run_from((), 0, None, (), race, done)
            start = 0
        else:
            need = range(first, len(self._nll.batches))
            start, key, states = pre.lookup(keys, need)
            ghost = start > 0 and states is None  # left by replay: recompute its blocks too, uncounted
            run_from = 0 if ghost else start
            source = None if run_from == 0 else (lambda b, s=states: s[b])
            capture = ([start] if ghost else []) + pre.positions(start)
            e, captured = self._nll._run_from((), run_from, source, capture, race, done)
            if e.complete:
                if self.cache_device is not None:
                    captured = {j: [None if h is None else _place(h, self.cache_device) for h in hs]
                                for j, hs in captured.items()}
                if ghost:
                    pre.fill(key, {b: captured[start][b] for b in need})
                pre.insert(keys, start, need, captured)
        self.n_evaluations += 1
        tl = self._cost(None if e.complete else len(e.batch_losses), start, first)
        self._spent += tl
        return Evaluation(e.loss, e.tokens, tl, e.batch_losses, e.complete)

    def replay(self, genome, batches: int | None = None, done: int = 0) -> int:
        """Apply :meth:`evaluate`'s prefix bookkeeping for ``genome`` without computing and return its
        ``token_layers`` (``batches``: of a raced evaluation that stopped after that many; ``done``: batches
        it continued from, see :meth:`extends`)."""
        keys = self.block_keys(genome)
        pre = self._prefix_of(keys)
        if pre is None:
            return self._cost(batches, 0, done)
        n = len(self._nll.batches)
        start, _, _ = pre.lookup(keys, range(done, n))
        if batches is None or batches >= n:
            pre.insert(keys, start, range(done, n), None)
        return self._cost(batches, start, done)

    def release(self) -> None:
        """Free the dense KL targets and the cached block-prefix states (see :meth:`NLLEvaluator.release`)."""
        self._nll.release()
        if self.prefix is not None:
            self.prefix.release()


class WidthEvaluator(WholeModelEvaluator):
    """Scores per-layer width rates of ``lm`` on ``calib``, structures ranked by ``importance``.

    ``evaluate(rates)`` returns an :class:`Evaluation` (``loss``: mean NLL, or KL
    to the dense model with ``metric="kl"``, in nats per predicted token;
    ``tokens``; ``token_layers = n_samples * seqlen * n_layers``). ``rates`` is a
    sequence of floats in ``[0, 1]``, one per block, or a ``RateVector``.
    The model is edited in place inside each evaluation and restored bit for bit. With ``recon`` (a
    :class:`~evoprune.prune.reconstruct.Reconstruction` of ``lm``) the kept output-projection columns are the
    reconstructed ones; a block's states still depend only on the structures it keeps (its block key).
    """

    def __init__(self, lm: LoadedModel, calib: CalibSet, importance: WidthImportance, *, batch_size: int = 1,
                 metric: str = "nll", kl_topk: int | None = None, progress: bool = False, cache_mb: float = 0.0,
                 cache_every: int | None = None, cache_device: str | None = None, recon=None) -> None:
        super().__init__(lm, calib, batch_size=batch_size, metric=metric, kl_topk=kl_topk, progress=progress,
                         cache_mb=cache_mb, cache_every=cache_every, cache_device=cache_device)
        self.importance, self.recon = importance, recon
        self.spec = width_spec(lm.model, lm.adapter)
        self.plan([0.0] * self.n_layers)  # fail now if the importance does not fit the model

    # -- evaluation ---------------------------------------------------------------
    def plan(self, rates: Sequence[float]) -> WidthPlan:
        """The :class:`WidthPlan` for ``rates`` (no forward)."""
        return plan_widths(self.spec, self.importance, rates)

    def block_keys(self, rates) -> tuple:
        """Per block, the attention groups and MLP channels kept (the importance fixes which)."""
        return self._keys(self.plan(rates))

    @staticmethod
    def _keys(plan: WidthPlan) -> tuple:
        return tuple(zip(map(len, plan.kept_groups), map(len, plan.kept_channels)))

    def evaluate(self, rates: Sequence[float], race=None, done: Sequence[float] = ()) -> Evaluation:
        """Score ``rates`` (:class:`~evoprune.errors.UserError` if they do not fit the model), raced by ``race``,
        continuing from the batch totals ``done`` (see :meth:`extends`)."""
        plan = self.plan(rates)
        self._nll.prepare()  # dense targets must come from the unmasked model
        edit = width_masked(self.lm.model, plan, self.lm.adapter) if self.recon is None else \
            self.recon.applied(self.lm.model, plan)
        with edit:
            return self._score(race, self._keys(plan), done)


def share_prefixes(evaluators: Sequence[WholeModelEvaluator], cache_mb: float, cache_every: int | None = None) -> None:
    """Give a run's stage evaluators (cheapest first, the whole set last) their block-prefix LRUs: ``cache_mb``
    MiB in all, split evenly by stage; the stages whose data are leading batches of the last stage's
    (:meth:`~WholeModelEvaluator.extends`) share one LRU with it (pooling their shares), so a candidate
    continued from such a stage finds the states it left there. Stages without block keys (training) get none."""
    last = evaluators[-1]
    groups: dict[int, list] = {}
    for ev in evaluators:
        groups.setdefault(id(last) if ev is last or last.extends(ev) else id(ev), []).append(ev)
    for members in groups.values():
        big = members[-1]
        mb = float(cache_mb) * len(members) / len(evaluators)
        prefix = BlockPrefix(big.n_layers, mb * 2 ** 20, big._nll.lru_entry_bytes, cache_every) if mb > 0 else None
        for ev in members:
            ev.prefix = prefix

