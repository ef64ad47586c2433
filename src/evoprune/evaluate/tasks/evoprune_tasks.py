"""Python helpers the offline task YAMLs reference with ``!function evoprune_tasks.NAME``.

Datasets come from :func:`evoprune.evaluate.zeroshot.local_dataset`. Prompt
helpers are lm-eval's own stock functions, imported (not copied) so that the
offline tasks cannot drift from the stock ones.
"""
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)

from evoprune.evaluate.zeroshot import local_dataset


def arc_easy(**_):
    return local_dataset("arc_easy")


def arc_challenge(**_):
    return local_dataset("arc_challenge")


def hellaswag(**_):
    return local_dataset("hellaswag")


def piqa(**_):
    return local_dataset("piqa")


def winogrande(**_):
    return local_dataset("winogrande")


def boolq(**_):
    return local_dataset("boolq")


def openbookqa(**_):
    return local_dataset("openbookqa")
