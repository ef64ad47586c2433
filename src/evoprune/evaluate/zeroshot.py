"""Zero-shot accuracy through lm-evaluation-harness, offline by default.

Owns the library call :func:`zeroshot` and the offline task data; the command ``evoprune eval`` is
:mod:`evoprune.cli.evaluate`. The in-memory (possibly pruned) model is wrapped in
lm-eval's stock ``HFLM`` and scored by ``lm_eval.simple_evaluate``; nothing is
re-implemented here.

Offline tasks (the default) are the YAMLs in ``evoprune/evaluate/tasks``: each
is the stock lm-eval task with only its dataset swapped for the local copy under
:func:`~evoprune.data.sources.data_dir` (``$EVOPRUNE_DATA`` or
``../shared/data``). :func:`local_rows` turns each local file into rows of the
Hugging Face schema the stock task reads (joining the PIQA / WinoGrande label
files, renaming BoolQ and OpenBookQA fields), in memory; nothing is copied.
The offline tasks are named ``evoprune_<task>`` inside lm-eval and reported
under the stock names. ``--stock-tasks`` runs lm-eval's own tasks instead
(needs the hub).

Few-shot prompts need the training splits, which are not in the local data, so
offline evaluation is zero-shot only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

__all__ = ["TASKS", "DEFAULT_TASKS", "tasks_dir", "task_manager", "data_files", "local_rows", "local_dataset", "build_tasks",
           "zeroshot"]

# stock task -> (local files under the data dir, the split the stock task evaluates)
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "arc_easy": (("arc_easy/test.json",), "test"),
    "arc_challenge": (("arc_challenge/test.jsonl",), "test"),
    "hellaswag": (("hellaswag/hellaswag_val.jsonl",), "validation"),
    "piqa": (("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation"),
    "winogrande": (("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), "validation"),
    "boolq": (("boolq/dev.jsonl",), "validation"),
    "openbookqa": (("openbookqa/test.jsonl",), "test"),
}
DEFAULT_TASKS = tuple(TASKS)
OFFLINE_PREFIX = "evoprune_"


def tasks_dir() -> Path:
    """The directory of the offline task YAMLs (package data)."""
    return Path(__file__).resolve().parent / "tasks"


def _root(root: str | Path | None) -> Path:
    from ..data.sources import data_dir

    d = Path(root) if root is not None else data_dir()
    if d is None:
        raise UserError("no local data directory for the offline tasks: set EVOPRUNE_DATA (or use --stock-tasks)")
    return d


def data_files(task: str, root: str | Path | None = None) -> list[Path]:
    """The local files of ``task``; :class:`UserError` naming the first that is missing."""
    if task not in TASKS:
        raise UserError(f"unknown offline task {task!r} (choose from {', '.join(TASKS)}; other tasks need --stock-tasks)")
    d = _root(root)
    paths = [d / rel for rel in TASKS[task][0]]
    for p in paths:
        if not p.is_file():
            raise UserError(f"data file not found for task {task}: {p}")
    return paths


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _labels(path: Path, n: int) -> list[str]:
    labels = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if len(labels) != n:
        raise UserError(f"{path}: {len(labels)} labels for {n} documents")
    return labels


def _field(path: Path, row: dict, key: str):
    try:
        return row[key]
    except (KeyError, TypeError):
        raise UserError(f"{path}: a record lacks field {key!r}") from None


@lru_cache(maxsize=None)
def _rows_cached(task: str, root: str) -> tuple[dict, ...]:
    paths = data_files(task, root)
    p = paths[0]
    if task == "arc_easy" and p.suffix == ".json":
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e.msg})") from None
    else:
        raw = _jsonl(p)
    rows: list[dict] = []
    if task in ("arc_easy", "arc_challenge"):  # allenai/ai2_arc: the local files already have its fields
        for r in raw:
            rows.append({"id": _field(p, r, "id"), "question": _field(p, r, "question"),
                         "choices": {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])},
                         "answerKey": _field(p, r, "answerKey")})
    elif task == "hellaswag":  # Rowan/hellaswag: the same fields, but `label` is a string there
        for r in raw:
            rows.append({"ind": r.get("ind"), "activity_label": _field(p, r, "activity_label"),
                         "ctx_a": _field(p, r, "ctx_a"), "ctx_b": _field(p, r, "ctx_b"), "ctx": r.get("ctx", ""),
                         "endings": list(_field(p, r, "endings")), "source_id": r.get("source_id", ""),
                         "split": r.get("split", ""), "split_type": r.get("split_type", ""),
                         "label": str(_field(p, r, "label"))})
    elif task == "piqa":  # baber/piqa: goal, sol1, sol2, label (int) joined from the .lst file
        for r, lab in zip(raw, _labels(paths[1], len(raw))):
            rows.append({"goal": _field(p, r, "goal"), "sol1": _field(p, r, "sol1"), "sol2": _field(p, r, "sol2"),
                         "label": int(lab)})
    elif task == "winogrande":  # allenai/winogrande winogrande_xl: answer "1"/"2" (string), from the .lst file
        for r, lab in zip(raw, _labels(paths[1], len(raw))):
            if "answer" in r and str(r["answer"]) != lab:
                raise UserError(f"{paths[1]}: label {lab!r} disagrees with {p} ({r.get('qID')}: {r['answer']!r})")
            rows.append({"sentence": _field(p, r, "sentence"), "option1": _field(p, r, "option1"),
                         "option2": _field(p, r, "option2"), "answer": lab})
    elif task == "boolq":  # aps/super_glue boolq: question, passage, idx, label (0 = False, 1 = True)
        for i, r in enumerate(raw):
            rows.append({"question": _field(p, r, "question"), "passage": _field(p, r, "passage"), "idx": i,
                         "label": int(bool(_field(p, r, "answer")))})
    elif task == "openbookqa":  # allenai/openbookqa main: question_stem, choices{text,label}, answerKey
        for r in raw:
            q = _field(p, r, "question")
            ch = _field(p, q, "choices")
            rows.append({"id": _field(p, r, "id"), "question_stem": _field(p, q, "stem"),
                         "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]},
                         "answerKey": _field(p, r, "answerKey")})
    if not rows:
        raise UserError(f"{p}: no documents")
    return tuple(rows)


def local_rows(task: str, root: str | Path | None = None) -> list[dict]:
    """The local documents of stock task ``task`` as rows of the HF dataset schema lm-eval's stock task reads."""
    return [dict(r) for r in _rows_cached(task, str(_root(root)))]


def local_dataset(task: str, root: str | Path | None = None):
    """A ``datasets.DatasetDict`` holding the local documents under the split the stock task evaluates."""
    import datasets

    split = TASKS[task][1] if task in TASKS else None
    return datasets.DatasetDict({split: datasets.Dataset.from_list(local_rows(task, root))})


def _quiet_lm_eval() -> None:
    if not os.environ.get("EVOPRUNE_VERBOSE"):
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _parse_tasks(text: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t and t.strip()]
    if not names:
        raise UserError("--tasks is empty")
    if len(set(names)) != len(names):
        raise UserError(f"--tasks names a task twice: {','.join(names)}")
    return names


def task_manager(stock: bool = False):
    """An lm-eval ``TaskManager``: the offline task directory only, or lm-eval's stock tasks."""
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    if stock:
        return TaskManager()
    return TaskManager(include_path=str(tasks_dir()), include_defaults=False)


def build_tasks(names, *, stock: bool = False, num_fewshot: int = 0, tm=None) -> tuple[dict, object]:
    """Instantiate lm-eval tasks for stock names ``names``: ``({stock name: Task}, task_manager)``.

    Offline (default): checks every local file first (:class:`UserError` naming a
    missing one) and refuses ``num_fewshot > 0``. ``stock=True``: lm-eval's own
    tasks, which download their data from the hub.
    """
    names = _parse_tasks(names)
    if num_fewshot < 0:
        raise UserError("--num-fewshot must be >= 0")
    if not stock:
        if num_fewshot > 0:
            raise UserError("few-shot prompts need the training splits, which the local data lacks: "
                            "use --num-fewshot 0, or --stock-tasks with hub access")
        for t in names:
            data_files(t)
    tm = tm or task_manager(stock)
    internal = {t: (t if stock else OFFLINE_PREFIX + t) for t in names}
    if stock:
        unknown = [t for t in names if t not in tm.all_tasks]
        if unknown:
            raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    try:
        loaded = tm.load(list(internal.values()))["tasks"]
    except UserError:
        raise
    except Exception as e:
        if stock:
            raise UserError(f"lm-eval stock tasks could not load their data ({type(e).__name__}: {e}); "
                            "drop --stock-tasks to use the local files") from None
        raise
    missing = [t for t, i in internal.items() if i not in loaded]
    if missing:
        raise UserError(f"lm-eval did not build task(s) {', '.join(missing)} (groups are not supported here)")
    return {t: loaded[i] for t, i in internal.items()}, tm


def _num(x):
    """A metric value as float; ``None`` for missing / ``"N/A"`` (lm-eval's stderr of one document) / NaN."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def zeroshot(model, tokenizer, tasks=DEFAULT_TASKS, *, limit: int | None = None, num_fewshot: int = 0,
             batch_size: int = 8, stock: bool = False, built: dict | None = None) -> dict:
    """Score ``model`` (an in-memory HF causal LM, pruned or not) on ``tasks`` with lm-eval.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}},
    "mean_acc", "mean_acc_norm_or_acc", ...}``; ``acc_norm`` is ``None`` where the
    stock task has none (winogrande, boolq). ``built`` takes the result of
    :func:`build_tasks` to skip building the tasks again.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise UserError("the model has no tokenizer; lm-eval needs one")
    if limit is not None and limit < 1:
        raise UserError("--limit must be >= 1")
    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    task_objs, tm = built if built is not None else build_tasks(tasks, stock=stock, num_fewshot=num_fewshot)
    _quiet_lm_eval()
    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(task_objs.values()), num_fewshot=num_fewshot,
                                  batch_size=batch_size, limit=limit, log_samples=False, task_manager=tm)
    seconds = time.perf_counter() - t0
    results, nsamp = out["results"], out.get("n-samples", {})
    per_task = {}
    for name, task in task_objs.items():
        key = task.config.task
        r = results[key]
        per_task[name] = {
            "acc": _num(r.get("acc,none")), "acc_stderr": _num(r.get("acc_stderr,none")),
            "acc_norm": _num(r.get("acc_norm,none")), "acc_norm_stderr": _num(r.get("acc_norm_stderr,none")),
            "n": int(nsamp.get(key, {}).get("effective", 0)) or None,
        }
    accs = [v["acc"] for v in per_task.values() if v["acc"] is not None]
    mixed = [v["acc_norm"] if v["acc_norm"] is not None else v["acc"] for v in per_task.values()]
    mixed = [x for x in mixed if x is not None]
    return {
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "mean_acc_norm_or_acc": sum(mixed) / len(mixed) if mixed else None,
        "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
        "task_source": "stock" if stock else "offline",
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds": round(seconds, 2),
    }
