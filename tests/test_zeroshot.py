"""Zero-shot evaluation: offline lm-eval tasks are the stock ones on local data; ``evoprune eval`` end to end.

Equivalence: lm-eval's *stock* task (built from its own installed YAML, only its
``download`` replaced so that it reads hub-schema rows this test writes from the
local files itself) and evoprune's offline task must give, on the same documents,
the same eval split, output type, metrics, targets and loglikelihood requests
(context, continuation); both request lists are then scored by one tiny model
through lm-eval's HFLM and must give the same log-likelihoods and per-document
acc / acc_norm.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from evoprune.data.sources import data_dir  # noqa: E402
from evoprune.errors import UserError  # noqa: E402
from evoprune.cli.evaluate import cmd_eval  # noqa: E402
from evoprune.evaluate import zeroshot as zs  # noqa: E402

TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa"]
# documents per split, from each folder's SOURCE.md
COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
          "boolq": 3270, "openbookqa": 500}
# where lm-eval keeps the stock YAML of each task (indexing only these dirs is fast)
STOCK_DIRS = ["arc", "hellaswag", "piqa", "winogrande", "super_glue/boolq", "openbookqa"]

pytestmark = pytest.mark.skipif(
    data_dir() is None or not (data_dir() / "arc_easy" / "test.json").is_file(), reason="no local task data")


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(s) for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]


def hub_rows(task: str) -> list[dict]:
    """The local files written out in the HF hub schema of the dataset the stock task names.

    Written independently of evoprune's converter, from the dataset cards:
    allenai/ai2_arc, Rowan/hellaswag (label is a string), baber/piqa,
    allenai/winogrande (answer "1"/"2"), aps/super_glue boolq (label 0/1, idx),
    allenai/openbookqa main (question_stem, choices{text,label}).
    """
    d = data_dir()
    if task == "arc_easy":
        return json.loads((d / "arc_easy/test.json").read_text())
    if task == "arc_challenge":
        return _jsonl(d / "arc_challenge/test.jsonl")
    if task == "hellaswag":
        return [{**r, "label": str(r["label"])} for r in _jsonl(d / "hellaswag/hellaswag_val.jsonl")]
    if task == "piqa":
        labels = (d / "piqa/valid-labels.lst").read_text().split()
        return [{**r, "label": int(y)} for r, y in zip(_jsonl(d / "piqa/valid.jsonl"), labels, strict=True)]
    if task == "winogrande":
        labels = (d / "winogrande/dev-labels.lst").read_text().split()
        return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y}
                for r, y in zip(_jsonl(d / "winogrande/dev.jsonl"), labels, strict=True)]
    if task == "boolq":
        return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": 1 if r["answer"] else 0}
                for i, r in enumerate(_jsonl(d / "boolq/dev.jsonl"))]
    if task == "openbookqa":
        return [{"id": r["id"], "question_stem": r["question"]["stem"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]},
                 "answerKey": r["answerKey"]} for r in _jsonl(d / "openbookqa/test.jsonl")]
    raise KeyError(task)


def pick(n: int) -> list[int]:
    """A few documents spread over the split (first ones, middle, last)."""
    return sorted({0, 1, 2, n // 3, n // 2, n - 1})


def eval_split(task) -> str:
    return task.config.test_split if task.has_test_docs() else task.config.validation_split


@pytest.fixture(scope="module")
def offline():
    tasks, _ = zs.build_tasks(TASKS)
    return tasks


@pytest.fixture(scope="module")
def stock():
    """lm-eval's stock tasks from their installed YAMLs, fed the chosen documents instead of the hub."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    chosen = {}
    for t in TASKS:
        rows = hub_rows(t)
        chosen[t] = [rows[i] for i in pick(len(rows))]

    def fake_download(self, dataset_kwargs=None, **kw):
        ds = datasets.Dataset.from_list(chosen[self.config.task])
        self.dataset = datasets.DatasetDict({s: ds for s in ("train", "validation", "test")})

    mp = pytest.MonkeyPatch()
    mp.setattr(ConfigurableTask, "download", fake_download)
    try:
        tm = TaskManager(include_path=[str(root / s) for s in STOCK_DIRS], include_defaults=False)
        for t in TASKS:
            assert str(tm.task_index[t].yaml_path).startswith(str(root)), t
        tasks = tm.load(TASKS)["tasks"]
    finally:
        mp.undo()
    return tasks


def _requests(task, **kw):
    task.build_all_requests(rank=0, world_size=1, **kw)
    per_doc: dict[int, list] = {}
    for inst in task.instances:
        per_doc.setdefault(inst.doc_id, []).append(inst)
    return [sorted(v, key=lambda i: i.idx) for _, v in sorted(per_doc.items())]


def test_local_rows_match_source_counts_and_schema():
    for t in TASKS:
        rows = zs.local_rows(t)
        assert len(rows) == COUNTS[t], t
        assert rows == hub_rows(t), t  # identical to the independent conversion above
    assert zs.local_rows("arc_challenge")[0]["id"] == "Mercury_7175875"  # SOURCE.md
    hs = zs.local_rows("hellaswag")[0]
    assert hs["label"] == "3" and hs["ind"] == 24


@pytest.mark.parametrize("name", TASKS)
def test_offline_task_equals_stock(name, offline, stock):
    off, st = offline[name], stock[name]
    assert off.config.task == f"evoprune_{name}" and st.config.task == name
    assert off.OUTPUT_TYPE == st.OUTPUT_TYPE == "multiple_choice"
    assert eval_split(off) == eval_split(st)
    assert set(off._metric_fn_list) == set(st._metric_fn_list)
    assert {m: off._aggregation_list[m] for m in off._metric_fn_list} == \
        {m: st._aggregation_list[m] for m in st._metric_fn_list}
    assert off._higher_is_better == st._higher_is_better
    assert (off.config.target_delimiter, off.config.fewshot_delimiter) == \
        (st.config.target_delimiter, st.config.fewshot_delimiter)
    expected = {"winogrande": {"acc"}, "boolq": {"acc"}}.get(name, {"acc", "acc_norm"})
    assert set(off._metric_fn_list) == expected

    idx = pick(COUNTS[name])
    off_docs = [off.eval_docs[i] for i in idx]
    st_docs = list(st.eval_docs)
    assert len(st_docs) == len(idx)
    for a, b in zip(off_docs, st_docs):
        assert off.doc_to_text(a) == st.doc_to_text(b)
        assert off.doc_to_target(a) == st.doc_to_target(b)
        assert off.doc_to_choice(a) == st.doc_to_choice(b)
    off_req = _requests(off, samples=idx)
    st_req = _requests(st)
    assert [[i.arguments for i in d] for d in off_req] == [[i.arguments for i in d] for d in st_req]
    assert all(len(d) >= 2 for d in off_req)


@pytest.fixture(scope="module")
def tiny_hflm(tiny_dirs):
    from lm_eval.models.huggingface import HFLM
    from evoprune import load_model

    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    return HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)


def test_same_loglikelihoods_and_scores(offline, stock, tiny_hflm):
    for name in TASKS:
        idx = pick(COUNTS[name])
        off_req, st_req = _requests(offline[name], samples=idx), _requests(stock[name])
        flat_off = [i for d in off_req for i in d]
        flat_st = [i for d in st_req for i in d]
        ll_off = tiny_hflm.loglikelihood(flat_off, disable_tqdm=True)
        ll_st = tiny_hflm.loglikelihood(flat_st, disable_tqdm=True)
        assert ll_off == ll_st, name
        pos = 0
        for d_off, d_st in zip(off_req, st_req):
            res = ll_off[pos:pos + len(d_off)]
            pos += len(d_off)
            assert offline[name].process_results(d_off[0].doc, res) == stock[name].process_results(d_st[0].doc, res)


def _args(argv):
    from evoprune import cli

    return cli.build_parser().parse_args(["eval", *argv])


def test_eval_end_to_end_tiny(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = cmd_eval(_args([str(tiny_dirs["llama"]), "--tasks", "arc_easy,winogrande", "--limit", "2",
                            "--batch-size", "2", "--out", str(out)]))
    assert rc == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    res = json.loads(stdout[-1])
    assert list(res["tasks"]) == ["arc_easy", "winogrande"]
    for t, v in res["tasks"].items():
        assert 0.0 <= v["acc"] <= 1.0 and v["n"] == 2, t
    assert 0.0 <= res["tasks"]["arc_easy"]["acc_norm"] <= 1.0
    assert res["tasks"]["winogrande"]["acc_norm"] is None
    assert res["mean_acc"] == pytest.approx((res["tasks"]["arc_easy"]["acc"] + res["tasks"]["winogrande"]["acc"]) / 2)
    assert res["task_source"] == "offline" and res["limit"] == 2
    assert any(line.startswith("arc_easy") for line in stdout[:-1])  # the table
    assert json.loads(out.read_text()) == res

    # --drop: the blocks are removed before scoring
    assert cmd_eval(_args([str(tiny_dirs["llama"]), "--tasks", "boolq", "--limit", "1", "--drop", "1,4"])) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["dropped_layers"] == [1, 4] and res["n_layers"] == 4 and 0.0 <= res["tasks"]["boolq"]["acc"] <= 1.0


def test_missing_data_file_names_it(tmp_path, monkeypatch):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    monkeypatch.setenv("EVOPRUNE_DATA", str(tmp_path))
    with pytest.raises(UserError, match=r"piqa/valid-labels\.lst"):
        zs.build_tasks("piqa")
    with pytest.raises(UserError, match=r"arc_easy/test\.json"):
        cmd_eval(_args(["does-not-matter", "--tasks", "arc_easy"]))


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown offline task"):
        zs.build_tasks("mmlu")
    with pytest.raises(UserError, match="few-shot"):
        zs.build_tasks("arc_easy", num_fewshot=5)


def test_cli_wiring_error_contract(capsys):
    from evoprune import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "eval" not in sub.choices:
        pytest.skip("eval not wired into evoprune.cli yet")
    assert cli.main(["eval", "smollm2-135m", "--tasks", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evoprune: error:") and "nosuch" in err[0]
