"""The model-adapter contract and its registry.

Owns everything that knows where a family keeps its decoder blocks, attention
and MLP projections, head counts and per-layer config lists, and how to drop
blocks reversibly. Width pruning (:mod:`evoprune.models.slicing`) works from
:meth:`Adapter.width_layout`, the same attribute paths as plain data. Other
modules ask ``get_adapter(model)`` and never branch on ``model_type`` themselves.

Registering a family (:func:`register`) also looks up its stock config and
causal-LM class names in ``transformers``' auto mappings (:func:`hf_classes`),
which the width-pruned export's generated remote code subclasses; a model type
that ``transformers`` does not know as a causal LM fails there, at registration,
not later at export.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

from ..errors import UserError
from ..spaces import DropPattern, GenomeError, SublayerPattern

__all__ = ["Adapter", "ADAPTERS", "register", "get_adapter", "adapter_for_type", "hf_classes", "family"]

ADAPTERS: dict[str, "Adapter"] = {}
_HF_CLASSES: dict[str, tuple[str, str]] = {}


def _hf_class_names(model_type: str) -> tuple[str, str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config, model = CONFIG_MAPPING_NAMES.get(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not (isinstance(config, str) and isinstance(model, str)):
        raise ValueError(f"cannot register an adapter for {model_type!r}: this transformers has no causal LM of "
                         f"that model_type (config {config!r}, model {model!r})")
    return config, model


def register(*model_types: str):
    """Class decorator: register one adapter instance under each ``model_type`` (see the module docstring)."""

    def deco(cls):
        inst = cls()
        for t in model_types:
            _HF_CLASSES[t] = _hf_class_names(t)
            ADAPTERS[t] = inst
        return cls

    return deco


def hf_classes(model_type: str) -> tuple[str, str]:
    """``(config class, causal-LM class)`` names in ``transformers`` of a registered family."""
    adapter_for_type(model_type)
    return _HF_CLASSES[model_type]


def adapter_for_type(model_type: str) -> "Adapter":
    """Adapter for a ``config.model_type``; :class:`UserError` when unsupported."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UserError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ADAPTERS))})"
        ) from None


def family(model: nn.Module) -> str:
    """The registry key of a loaded model's family (its config's ``model_type``)."""
    return str(model.config.model_type)


def get_adapter(model: nn.Module) -> "Adapter":
    """Adapter for a loaded HF causal LM."""
    return adapter_for_type(model.config.model_type)


@dataclass(frozen=True)
class Adapter:
    """How one architecture family is laid out.

    Attribute paths are dotted, relative to the causal-LM module (``blocks``)
    or to one decoder block (the rest). ``mlp_in`` are the projections whose
    *output rows* are MLP channels; ``mlp_out`` is the projection whose *input
    columns* are MLP channels (so channel pruning slices rows of ``mlp_in`` and
    columns of ``mlp_out``).
    """

    blocks: str = "model.layers"
    norm: str = "model.norm"  # final norm applied to the last block's output
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    # the norm whose input is the residual stream between a block's attention and its MLP
    mlp_norm: str = "post_attention_layernorm"
    # config attributes holding one entry per decoder layer, kept in step with drops
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    # attention-module attributes holding the number of query heads that the forward reads
    # (set per block after width pruning; Llama-layout attention infers it from the q shape)
    attn_head_attrs: tuple[str, ...] = ()

    # ---- layout -----------------------------------------------------------------
    def _parent(self, model: nn.Module) -> tuple[nn.Module, str]:
        *path, last = self.blocks.split(".")
        mod = model
        for p in path:
            mod = getattr(mod, p)
        return mod, last

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks as the model currently runs them."""
        parent, attr = self._parent(model)
        return getattr(parent, attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.norm)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.get_blocks(model))

    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attn)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.mlp) if self.mlp else block

    def residual_site(self, block: nn.Module) -> nn.Module:
        """The module whose (first) input is the residual stream after ``block``'s attention, before its MLP
        (a forward-pre hook there reads or replaces that state; OPT flattens it to ``[B*T, hidden]``)."""
        return block.get_submodule(self.mlp_norm)

    def head_dim(self, config) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    def n_kv_heads(self, config) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def intermediate_size(self, config) -> int:
        return int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim"))

    def heads_per_group(self, config) -> int:
        """Query heads sharing one key/value head (1 for multi-head attention)."""
        return int(config.num_attention_heads) // self.n_kv_heads(config)

    def projection_names(self) -> tuple[str, ...]:
        """The attention and MLP projections of a block, by their last path component, in block order."""
        paths = (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)
        return tuple(p.rsplit(".", 1)[-1] for p in paths)

    def width_layout(self) -> dict:
        """Attribute paths for width pruning as JSON-able data (stored in width-pruned exports' config)."""
        return {"blocks": self.blocks, "attn": self.attn, "q": self.q, "k": self.k, "v": self.v, "o": self.o,
                "mlp": self.mlp, "mlp_in": list(self.mlp_in), "mlp_out": self.mlp_out,
                "head_attrs": list(self.attn_head_attrs)}

    def info(self, model: nn.Module) -> dict:
        """Shape summary: layers, heads, KV heads, head dim, hidden, intermediate, params."""
        c = model.config
        return {
            "model_type": c.model_type,
            "layers": self.n_layers(model),
            "heads": int(c.num_attention_heads),
            "kv_heads": self.n_kv_heads(c),
            "head_dim": self.head_dim(c),
            "hidden": int(c.hidden_size),
            "intermediate": self.intermediate_size(c),
            "vocab": int(c.vocab_size),
            "params": sum(p.numel() for p in model.parameters()),
            "block_params": sum(p.numel() for p in self.get_blocks(model).parameters()),
            # per block, as the model now is (width-pruned and attention-free blocks differ): the FLOP model's input
            "layer_params": [sum(p.numel() for p in b.parameters()) for b in self.get_blocks(model)],
            "layer_heads": [self._query_heads(b, c) for b in self.get_blocks(model)],
        }

    def _query_heads(self, block: nn.Module, config) -> int:
        """Query heads block ``block`` computes (0 for an attention that was removed or emptied)."""
        try:
            q = self.attention(block).get_submodule(self.q)
        except AttributeError:
            return 0
        return int(q.out_features) // self.head_dim(config)

    # ---- dropping -----------------------------------------------------------------
    def pattern(self, model: nn.Module, layers: Sequence[int] | DropPattern) -> DropPattern:
        """Validate ``layers`` against this model; :class:`UserError` on bad indices."""
        if isinstance(layers, DropPattern):
            if layers.n_layers != self.n_layers(model):
                raise UserError(f"pattern is for {layers.n_layers} layers, model has {self.n_layers(model)}")
            return layers
        try:
            return DropPattern(self.n_layers(model), tuple(layers))
        except GenomeError as e:
            raise UserError(str(e)) from None

    def _set_layer_idx(self, block: nn.Module, idx: int) -> None:
        # the KV cache is indexed by layer_idx, so kept blocks must be renumbered 0..n-k-1
        for mod in (block, self.attention(block)):
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = idx

    def _layer_idx(self, block: nn.Module) -> list:
        return [getattr(m, "layer_idx", None) for m in (block, self.attention(block))]

    def dropped_config(self, config, pattern: DropPattern):
        """A deep copy of ``config`` describing the model with ``pattern`` dropped."""
        new = copy.deepcopy(config)
        self._apply_config(new, pattern)
        return new

    def _apply_config(self, config, pattern: DropPattern) -> None:
        config.num_hidden_layers = len(pattern.kept)
        for key in self.per_layer_keys:
            val = getattr(config, key, None)
            if isinstance(val, (list, tuple)) and len(val) == pattern.n_layers:
                setattr(config, key, [val[i] for i in pattern.kept])

    def _apply_drop(self, model: nn.Module, pattern: DropPattern):
        """Apply ``pattern`` in place and return a zero-argument function that undoes it."""
        parent, attr = self._parent(model)
        blocks = getattr(parent, attr)
        configs = {id(c): c for c in (model.config, getattr(parent, "config", model.config))}
        keys = ("num_hidden_layers", *self.per_layer_keys)
        saved_cfg = {cid: {k: copy.copy(getattr(c, k)) for k in keys if hasattr(c, k)} for cid, c in configs.items()}
        saved_idx = [self._layer_idx(b) for b in blocks]

        def restore() -> None:
            setattr(parent, attr, blocks)
            for b, idx in zip(blocks, saved_idx):
                for mod, i in zip((b, self.attention(b)), idx):
                    if i is not None:
                        mod.layer_idx = i
            for cid, c in configs.items():
                for k, v in saved_cfg[cid].items():
                    setattr(c, k, v)

        try:
            kept = [blocks[i] for i in pattern.kept]
            setattr(parent, attr, nn.ModuleList(kept))
            for new_i, b in enumerate(kept):
                self._set_layer_idx(b, new_i)
            for c in configs.values():
                self._apply_config(c, pattern)
        except BaseException:
            restore()
            raise
        return restore

    def drop_inplace(self, model: nn.Module, layers: Sequence[int] | DropPattern) -> DropPattern:
        """Remove ``layers`` for good (the model object becomes the smaller model)."""
        pattern = self.pattern(model, layers)
        if pattern.dropped:
            self._apply_drop(model, pattern)
        return pattern

    @contextmanager
    def skipped(self, model: nn.Module, attention: Sequence[int] = (), mlp: Sequence[int] = ()
                ) -> Iterator[SublayerPattern]:
        """Run ``model`` with the attention of blocks ``attention`` and the MLP of blocks ``mlp`` removed (the
        block keeps its residual path), then put everything back.

        Blocks in both lists are dropped as by :meth:`dropped` (renumbered, config in step); the others
        keep their index, a removed attention still advancing the KV cache by a one-slot stub (see
        :mod:`evoprune.models.sublayers`). Zero-copy; :class:`UserError` on bad indices or a model whose
        sub-layers cannot be removed alone.
        """
        from .sublayers import check_sublayers, skip_sublayers

        try:
            pattern = SublayerPattern(self.n_layers(model), tuple(attention), tuple(mlp))
        except GenomeError as e:
            raise UserError(str(e)) from None
        whole = set(pattern.blocks)
        partial_a = [i for i in pattern.attention if i not in whole]
        partial_m = [i for i in pattern.mlp if i not in whole]
        if partial_a or partial_m:
            check_sublayers(model)
        restore = skip_sublayers(self, self.get_blocks(model), partial_a, partial_m)
        try:
            with self.dropped(model, sorted(whole)):
                yield pattern
        finally:
            restore()

    @contextmanager
    def dropped(self, model: nn.Module, layers: Sequence[int] | DropPattern) -> Iterator[DropPattern]:
        """Run ``model`` with ``layers`` removed, then put everything back.

        Zero-copy: the kept blocks are the same module objects, re-listed in a new
        ``nn.ModuleList``. Inside the scope ``config.num_hidden_layers``, per-layer
        config lists and each block's ``layer_idx`` describe the smaller model, so
        KV caches, masks and ``save_pretrained`` all see a consistent model.
        """
        pattern = self.pattern(model, layers)
        if not pattern.dropped:
            yield pattern
            return
        restore = self._apply_drop(model, pattern)
        try:
            yield pattern
        finally:
            restore()
