"""The typed contract between the loop, the per-space problems and their evaluators.

:class:`Evaluator` is what scores one fidelity stage's candidates; :class:`Problem` is what a search space
means for a loaded model. The loop (:mod:`evoprune.runner.loop`) and the Ray workers
(:mod:`evoprune.runner.distributed`) use nothing else of either; the strategy's side is
:class:`evoprune.search.base.Strategy` and its :class:`~evoprune.search.base.Selection`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol, Sequence

__all__ = ["Evaluator", "Problem"]


class Evaluator(Protocol):
    """Scores genomes on one stage's calibration slice (:class:`~evoprune.fitness.evaluation.Evaluation`)."""

    calib: Any  # the stage's CalibSet: ``n_tokens``, ``n_samples``, ``seqlen``
    dense_token_layers: int  # an upper bound of one evaluation's cost (the waves' planning)

    def evaluate(self, genome: Any, race: Any = None, done: Sequence[float] = ()) -> Any:
        """The genome's Evaluation: raced against ``race``, continuing from the batch losses ``done``."""

    def replay(self, genome: Any, batches: int | None = None, done: int = 0) -> int:
        """The token-layers :meth:`evaluate` reported for it, with the caches' bookkeeping updated to match."""

    def release(self) -> None:
        """Free the caches (the driver of a Ray run only replays)."""


class Problem(Protocol):
    """A search space for a loaded model (see :mod:`evoprune.runner.problems`)."""

    kind: ClassVar[str]
    options_cls: ClassVar[type]
    space: Any  # torch-free, handed to the strategy
    n: int  # decoder blocks
    evaluators: list[Evaluator]  # one per fidelity stage
    setup_files: tuple[str, ...]

    def prepare(self, calib: Any, run: Any, fresh: bool, needs: frozenset[str]) -> tuple[int, dict]:
        """Setup token-layers and the strategy's inputs (recovered from the run directory on resume)."""

    def row(self, genome: Any) -> dict:
        """The space's fields of a history row."""

    def result(self, genome: Any) -> dict:
        """The space's fields of ``result.json``."""

    def summary(self, genome: Any) -> str:
        """The space's part of the closing line."""
