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

Cost: every block runs on every token, ``token_layers = n_tokens * n_layers``
per evaluation (a width candidate changes every block it prunes, so there is no
dense prefix to reuse in general). The importance scores' own dense forward is
counted where they are computed (``WidthImportance.token_layers``).
"""
from __future__ import annotations

from typing import Sequence

from ..data.calibration import CalibSet
from ..models.loading import LoadedModel
from ..models.slicing import width_masked, width_spec
from ..prune.importance import WidthImportance
from ..prune.width_plan import WidthPlan, plan_widths
from ..spaces import DropPattern
from .evaluator import Evaluation, NLLEvaluator

__all__ = ["WholeModelEvaluator", "WidthEvaluator"]


class WholeModelEvaluator:
    """Base of evaluators that edit the whole model per candidate and score it with a naive
    :class:`~evoprune.fitness.evaluator.NLLEvaluator` (every block on every token, no prefix cache):
    the counters under :class:`NLLEvaluator`'s names, the dense KL targets, no replay state.
    Subclasses implement ``evaluate`` (scoring ``self._dense`` inside their edit) and may add
    ``extra_token_layers`` per evaluation (e.g. training)."""

    extra_token_layers = 0

    def __init__(self, lm: LoadedModel, calib: CalibSet, *, batch_size: int = 1, metric: str = "nll",
                 kl_topk: int | None = None, progress: bool = False) -> None:
        self.lm = lm
        self.calib = calib
        self.n_layers = lm.n_layers
        self._dense = DropPattern(self.n_layers)
        self._nll = NLLEvaluator(lm, calib, batch_size=batch_size, prefix_cache=False, metric=metric,
                                 kl_topk=kl_topk, progress=progress)
        self.n_evaluations = 0
        self._spent = 0

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

    def _cost(self, batches: int | None) -> int:
        """Token-layers of an evaluation that scored its first ``batches`` batches (``None``: all). Training
        (:attr:`extra_token_layers`) runs before any batch is scored, so it is always paid in full."""
        if batches is None or batches >= len(self._nll.batches):
            return self.dense_token_layers
        return self._nll.batch_input_tokens(batches) * self.n_layers + self.extra_token_layers

    def prepare(self) -> None:
        """Compute the dense KL targets now (``metric="kl"``), from the unedited model; a no-op for ``nll``."""
        self._nll.prepare()

    def _score(self, race=None):
        """The loss of the model as it is now (inside the subclass's edit), raced by ``race``; counts one
        evaluation."""
        e = self._nll.evaluate(self._dense, race=race)
        self.n_evaluations += 1
        tl = self._cost(None if e.complete else len(e.batch_losses))
        self._spent += tl
        return Evaluation(e.loss, e.tokens, tl, e.batch_losses, e.complete)

    def replay(self, genome, batches: int | None = None) -> int:
        """No caches depend on past candidates: nothing to replay; returns :meth:`evaluate`'s ``token_layers``
        (``batches``: of a raced evaluation that stopped after that many)."""
        return self._cost(batches)

    def release(self) -> None:
        """Free the dense KL targets (see :meth:`NLLEvaluator.release`)."""
        self._nll.release()


class WidthEvaluator(WholeModelEvaluator):
    """Scores per-layer width rates of ``lm`` on ``calib``, structures ranked by ``importance``.

    ``evaluate(rates)`` returns an :class:`Evaluation` (``loss``: mean NLL, or KL
    to the dense model with ``metric="kl"``, in nats per predicted token;
    ``tokens``; ``token_layers = n_samples * seqlen * n_layers``). ``rates`` is a
    sequence of floats in ``[0, 1]``, one per block, or a ``RateVector``.
    The model is edited in place inside each evaluation and restored bit for bit.
    """

    def __init__(self, lm: LoadedModel, calib: CalibSet, importance: WidthImportance, *, batch_size: int = 1,
                 metric: str = "nll", kl_topk: int | None = None, progress: bool = False) -> None:
        super().__init__(lm, calib, batch_size=batch_size, metric=metric, kl_topk=kl_topk, progress=progress)
        self.importance = importance
        self.spec = width_spec(lm.model, lm.adapter)
        self.plan([0.0] * self.n_layers)  # fail now if the importance does not fit the model

    # -- evaluation ---------------------------------------------------------------
    def plan(self, rates: Sequence[float]) -> WidthPlan:
        """The :class:`WidthPlan` for ``rates`` (no forward)."""
        return plan_widths(self.spec, self.importance, rates)

    def evaluate(self, rates: Sequence[float], race=None) -> Evaluation:
        """Score ``rates`` (:class:`~evoprune.errors.UserError` if they do not fit the model), raced by ``race``."""
        plan = self.plan(rates)
        self._nll.prepare()  # dense targets must come from the unmasked model
        with width_masked(self.lm.model, plan, self.lm.adapter):
            return self._score(race)
