"""Shared benchmark plumbing: named search runs, SLEB greedy prefixes, memoized held-out perplexity (of drop
patterns: :class:`HeldOut`; of models and run directories: :class:`Heldout`), a run's charged token-layers.

Every search is a real ``run_search`` run directory under a work dir (re-running reuses finished
ones); everything here runs on the bundled SmolLM2-135M.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from evoprune.runner.rundir import RunDir
from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.loop import run_search

MODEL = "smollm2-135m"


def search(work: Path, name: str, **kw) -> dict:
    """Run (or reuse) the search ``kw`` in ``work / name``; returns its ``result.json``."""
    cfg = SearchConfig.build(model=MODEL, **kw)
    t = time.time()
    res = run_search(cfg, work / name, progress=False)
    drop = (f"attn {res['dropped_attention']} mlp {res['dropped_mlp']}" if "dropped_attention" in res
            else res["dropped_layers"] if "dropped_layers" in res else f"rates {res.get('rates')}")
    print(f"  {name}: drop {drop} loss {res['calib_loss']:.4f} evals {res['evaluations']} "
          f"tl {res['token_layers']:.3g} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    return res


def sleb_prefixes(work: Path, name: str, ks: list[int], **kw) -> dict[int, dict]:
    """One greedy SLEB run to ``max(ks)``; its pattern after step k is what a k-block run returns
    (greedy is prefix-stable), charged the evaluations and token-layers spent up to that step."""
    res = search(work, name, method="sleb", drop_count=max(ks), **kw)
    rows = RunDir(work / name).read_history()
    out = {}
    for k in ks:
        step = [r for r in rows if r["generation"] == k - 1]
        best = min(step, key=lambda r: r["loss"])
        out[k] = {"dropped_layers": best["dropped"], "calib_loss": best["loss"],
                  "evaluations": sum(1 for r in rows if r["generation"] <= k - 1),
                  "token_layers": step[-1]["token_layers"], "wall_s": res["wall_s"] if k == max(ks) else None}
    assert out[max(ks)]["dropped_layers"] == res["dropped_layers"]
    return out


class HeldOut:
    """Held-out perplexity of drop patterns on ``datasets``, memoized; one model load for a whole script."""

    def __init__(self, seqlen: int, windows: int, datasets: tuple[str, ...] = ("wikitext2",)):
        from evoprune.data.sources import get_text
        from evoprune.evaluate.perplexity import tokenize_text
        from evoprune import load_model

        self.lm = load_model(MODEL, progress=False)
        self.seqlen, self.windows = seqlen, windows
        self.ids = {ds: tokenize_text(self.lm.tokenizer, get_text(ds, "eval")) for ds in datasets}
        self.memo: dict = {}

    def __call__(self, drop, ds: str = "wikitext2") -> float:
        from evoprune.evaluate.perplexity import perplexity

        key = (tuple(drop), ds)
        if key not in self.memo:
            with self.lm.adapter.dropped(self.lm.model, list(drop)):
                self.memo[key] = perplexity(self.lm.model, ids=self.ids[ds], seqlen=self.seqlen,
                                            max_windows=self.windows, progress=False).ppl
        return self.memo[key]


class Heldout:
    """Held-out wikitext2 test and c4 perplexity, ``windows`` x ``seqlen`` tokens each, of a model in memory
    (``heldout(model)``) or of a model spec as ``evoprune ppl`` loads it (``heldout.of(spec, key)``: a run
    directory or an export, reconstructed weights included; memoized in the JSON file ``memo_path`` under the
    caller's ``key``). The texts are tokenized once, by ``tokenizer`` or by the first loaded model's."""

    DATASETS = ("wikitext2", "c4")

    def __init__(self, windows: int, seqlen: int = 512, *, tokenizer=None, memo_path: Path | None = None):
        self.windows, self.seqlen, self.memo_path = windows, seqlen, memo_path
        self.memo = json.loads(memo_path.read_text()) if memo_path is not None and memo_path.exists() else {}
        self.ids: dict = {}
        if tokenizer is not None:
            self._tokenize(tokenizer)

    def _tokenize(self, tokenizer) -> None:
        from evoprune.data.sources import get_text
        from evoprune.evaluate.perplexity import tokenize_text

        for ds in self.DATASETS:
            self.ids.setdefault(ds, tokenize_text(tokenizer, get_text(ds, "eval")))

    def __call__(self, model) -> dict:
        from evoprune.evaluate.perplexity import perplexity

        return {ds: perplexity(model, ids=ids, seqlen=self.seqlen, max_windows=self.windows, progress=False).ppl
                for ds, ids in self.ids.items()}

    def of(self, spec, key: str) -> dict:
        from evoprune import load_model

        if key not in self.memo:
            lm = load_model(str(spec), progress=False)
            self._tokenize(lm.tokenizer)
            self.memo[key] = self(lm.model)
            if self.memo_path is not None:
                self.memo_path.write_text(json.dumps(self.memo, indent=1))
        return self.memo[key]


def charged_token_layers(res: dict) -> int:
    """A run's token-layers with the level database charged also when the run reused it from the cache."""
    db = res.get("levels_db") or {}
    return res["token_layers"] + (int(db.get("token_layers", 0)) if db and not db.get("built_by_this_run") else 0)
