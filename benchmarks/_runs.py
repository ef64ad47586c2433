"""Shared benchmark plumbing: named search runs, SLEB greedy prefixes, memoized held-out perplexity.

Every search is a real ``run_search`` run directory under a work dir (re-running reuses finished
ones); everything here runs on the bundled SmolLM2-135M.
"""
from __future__ import annotations

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
