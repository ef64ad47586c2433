"""Standalone code copied into width-pruned exports (``trust_remote_code``).

The two modules here import only ``torch`` and ``transformers`` — never
evoprune — because :func:`evoprune.export_width.export_width` copies them next to
the weights, where they run on machines without evoprune. evoprune imports them
too (:mod:`evoprune.models.width`), so the in-memory sliced model and the
exported one are built by the same code.
"""
