"""Offline lm-evaluation-harness task definitions (package data; see :mod:`evoprune.evaluate.zeroshot`).

Each ``evoprune_<task>.yaml`` is the stock lm-eval task of the same name with only
its dataset replaced: ``custom_dataset`` reads the local copy under
``$EVOPRUNE_DATA`` / ``../shared/data`` and yields rows in the Hugging Face schema
the stock task reads. Prompts (``doc_to_text`` / ``doc_to_target`` /
``doc_to_choice``), ``process_docs``, the evaluated split and the metrics are the
stock ones; ``tests/test_zeroshot.py`` checks this against the installed
lm-eval's own YAMLs.
"""
