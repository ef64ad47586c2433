"""``--space layers``: drop exactly k whole decoder blocks.

Owns :class:`LayersOptions` (the space's options) and :class:`LayerProblem`: the
:class:`~evoprune.spaces.LayerDropSpace`, one prefix-cached
:class:`~evoprune.fitness.evaluator.NLLEvaluator` per fidelity stage (dense hidden
states cached at every block input, built once per run and counted in
token-layers; ``cache_mb`` split evenly among the stages' LRUs), and, when the
strategy needs one-shot ``scores``, ShortGPT's Block Influence from the last
stage's cached dense states (no forward of its own). History rows carry
``dropped``; ``result.json`` ``sparsity``, ``n_layers``, ``k``, ``dropped_layers``,
``params`` / ``params_dense`` / ``param_sparsity`` (the pruned model's size, as every space records it:
:func:`~evoprune.models.sublayers.pruned_size`) and ``dense_token_layers_per_eval``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import UserError
from ...options import opt

__all__ = ["LayersOptions", "LayerProblem"]


@dataclass(frozen=True)
class LayersOptions:
    """Options of the layer-drop space."""

    protect_ends: bool = opt(False, "never drop the first or the last block (sublayers: nor its attention or MLP)")


class LayerProblem:
    """Block dropping; see the module docstring. ``cfg``: the :class:`~evoprune.runner.config.SearchConfig`."""

    kind = "layers"
    options_cls = LayersOptions
    setup_files: tuple[str, ...] = ("cache.json",)  # the resolved --cache-every (see .prefix)

    @staticmethod
    def check_config(cfg) -> None:
        """Cross-section checks that need no model (none for this space)."""

    def __init__(self, cfg, lm) -> None:
        from ...spaces import LayerDropSpace

        self.cfg, self.lm = cfg, lm
        n = self.n = lm.adapter.n_layers(lm.model)
        k = cfg.budget.k(n)
        protected = (0, n - 1) if cfg.space_options.protect_ends else ()
        if not 0 < k < n - len(protected):
            b = cfg.budget
            given = f"--drop-count {b.drop_count}" if b.drop_count is not None else f"--sparsity {b.sparsity}"
            raise UserError(f"{given}: cannot drop {k} of {n} blocks ({n - len(protected)} droppable)")
        self.space = LayerDropSpace(n, k, protected)
        self.evaluators: list = []

    def prepare(self, calib, run, fresh: bool, needs: frozenset) -> tuple[int, dict]:
        """Build the evaluators; when ``fresh``, run their dense forwards and compute the strategy's inputs.
        Returns ``(setup token-layers, inputs)``."""
        from .prefix import prefix_evaluators

        self.evaluators = prefix_evaluators(self.cfg, self.lm, calib, run, sublayers=False)
        spent, inputs = 0, {}
        if fresh:
            for ev in self.evaluators:  # the dense hidden-state caches: one dense forward each, counted once per run
                ev.prepare()
                spent += ev.setup_token_layers
            if "scores" in needs:  # Block Influence from the cached dense states of the full set
                inputs["scores"] = self.evaluators[-1].block_influence()
        return spent, inputs

    def row(self, g) -> dict:
        return {"dropped": list(g.dropped)}

    def result(self, g) -> dict:
        from ...models.sublayers import pruned_size

        return {"sparsity": g.k / self.n, "n_layers": self.n, "k": g.k, "dropped_layers": list(g.dropped),
                **pruned_size(self.lm.adapter, self.lm.model, g.dropped, g.dropped),
                "dense_token_layers_per_eval": self.evaluators[-1].dense_token_layers}

    def summary(self, g) -> str:
        return f"drop {list(g.dropped)}"
