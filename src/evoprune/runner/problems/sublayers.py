"""``--space sublayers``: drop attention and MLP sub-layers separately.

Owns :class:`SublayersOptions` and :class:`SublayerProblem`: the
:class:`~evoprune.spaces.SublayerSpace` (budget ``--drop-count k`` sub-layers, or ``--sparsity s`` of the
blocks' attention + MLP parameters; unit sizes read off the model), one prefix-cached
:class:`~evoprune.fitness.evaluator.NLLEvaluator` per fidelity stage with ``sublayers=True`` (dense
states at every block input and after every attention, built once per run and counted in
token-layers), per-sub-layer Block Influence from them as the one-shot ``scores``, and, for a method that
starts from the coarser space, the block search's answer at the same budget as ``start`` (run first by the
loop in ``RUN/blocks``: :mod:`evoprune.runner.coarse`). History rows
carry ``dropped_attention`` / ``dropped_mlp`` and ``feasible`` (meets the budget); ``result.json`` adds those, ``dropped_layers`` (blocks
with both removed), ``k`` (sub-layers), ``n_layers``, ``sparsity`` (share of the block parameters
removed), ``params_removed``, ``params`` / ``params_dense`` / ``param_sparsity`` (the pruned model's size) and
``dense_token_layers_per_eval``.
"""
from __future__ import annotations

from .layers import LayersOptions

__all__ = ["SublayersOptions", "SublayerProblem"]

SublayersOptions = LayersOptions  # the same option (protect_ends: neither sub-layer of the first and last block)


class SublayerProblem:
    """Sub-layer dropping; see the module docstring. ``cfg``: the :class:`~evoprune.runner.config.SearchConfig`."""

    kind = "sublayers"
    options_cls = SublayersOptions
    setup_files: tuple[str, ...] = ("cache.json",)  # the resolved --cache-every (see .prefix)

    @staticmethod
    def check_config(cfg) -> None:
        """Cross-section checks that need no model (none for this space)."""

    def __init__(self, cfg, lm) -> None:
        from ...models.sublayers import check_sublayers, sublayer_params
        from ...spaces import SublayerSpace

        self.cfg, self.lm = cfg, lm
        check_sublayers(lm.model)
        n = self.n = lm.adapter.n_layers(lm.model)
        attn, mlp = sublayer_params(lm.adapter, lm.model)
        protected = (0, n - 1) if cfg.space_options.protect_ends else ()
        b = cfg.budget
        self.space = SublayerSpace(n, attn, mlp, k=b.drop_count, sparsity=b.sparsity, protected=protected)
        self.evaluators: list = []

    def prepare(self, calib, run, fresh: bool, needs: frozenset) -> tuple[int, dict]:
        """Build the evaluators; when ``fresh``, run their dense forwards and compute the strategy's inputs."""
        from .prefix import prefix_evaluators

        self.evaluators = prefix_evaluators(self.cfg, self.lm, calib, run, sublayers=True)
        spent, inputs = 0, {}
        if fresh:
            for ev in self.evaluators:
                ev.prepare()
                spent += ev.setup_token_layers
            if "scores" in needs:
                inputs["scores"] = self.evaluators[-1].block_influence()
        return spent, inputs

    def row(self, g) -> dict:
        # greedy's intermediate steps drop less than the budget: the report tells them apart by this flag
        return {"dropped_attention": list(g.attention), "dropped_mlp": list(g.mlp), "feasible": self.space.feasible(g)}

    def result(self, g) -> dict:
        from ...models.sublayers import pruned_size

        removed = self.space.removed(g.units)
        return {"n_layers": self.n, "k": g.k, "dropped_attention": list(g.attention), "dropped_mlp": list(g.mlp),
                "dropped_layers": list(g.blocks), "sparsity": removed / self.space.total, "params_removed": removed,
                **pruned_size(self.lm.adapter, self.lm.model, g.attention, g.mlp),
                "dense_token_layers_per_eval": self.evaluators[-1].dense_token_layers}

    def summary(self, g) -> str:
        return f"drop attention {list(g.attention)}, MLP {list(g.mlp)}"
