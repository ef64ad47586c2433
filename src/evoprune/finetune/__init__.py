"""Post-pruning recovery and brief training: LoRA fine-tuning merged back into plain weights.

Public API: :class:`LoRAConfig`, :class:`BriefTrainConfig`, :class:`TrainingOptions` (pure, in
:mod:`.options`), :func:`finetune_lora` (in :mod:`.lora`), :func:`brief_train` (in :mod:`.brief`),
:func:`train_documents`, :func:`alpaca_documents`, :func:`pack_windows` (in :mod:`.data`). Imports are
lazy so that ``import evoprune.finetune.options`` stays torch-free; the export of a fine-tuned model is
:func:`evoprune.export.save_pruned`.
"""
from __future__ import annotations

__all__ = ["LoRAConfig", "BriefTrainConfig", "TrainingOptions", "finetune_lora", "default_targets", "brief_train",
           "train_documents", "alpaca_documents", "pack_windows", "TRAIN_SOURCES"]

_WHERE = {"LoRAConfig": "options", "BriefTrainConfig": "options", "TrainingOptions": "options",
          "finetune_lora": "lora", "default_targets": "lora", "brief_train": "brief", "train_documents": "data",
          "alpaca_documents": "data", "pack_windows": "data", "TRAIN_SOURCES": "options"}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
