"""Post-pruning recovery: LoRA fine-tuning merged back into plain weights.

Public API: :class:`LoRAConfig`, :func:`finetune_lora` (in :mod:`.lora`),
:func:`train_documents`, :func:`alpaca_documents`, :func:`pack_windows`
(in :mod:`.data`), :func:`save_finetuned` (the reload-checked export, in
:mod:`.command`, which also holds ``evoprune finetune``). Imports are
lazy so that ``import evoprune.finetune`` stays cheap.
"""
from __future__ import annotations

__all__ = ["LoRAConfig", "finetune_lora", "default_targets", "train_documents", "alpaca_documents", "pack_windows",
           "TRAIN_SOURCES", "save_finetuned"]


def __getattr__(name):
    if name in ("LoRAConfig", "finetune_lora", "default_targets"):
        from . import lora

        return getattr(lora, name)
    if name in ("train_documents", "alpaca_documents", "pack_windows", "TRAIN_SOURCES"):
        from . import data

        return getattr(data, name)
    if name == "save_finetuned":
        from .command import save_finetuned

        return save_finetuned
    raise AttributeError(name)
