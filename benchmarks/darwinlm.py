"""DarwinLM on SmolLM2-135M (issue 7): uniform vs one-shot vs training-aware level search, before and after LoRA.

For each sparsity (fraction of the decoder blocks' attention + MLP parameters removed):

- ``uniform``: the level database's most uniform vector (every block as close to the
  target as the ladders allow), one evaluation;
- ``darwinlm one-shot`` (``--training-aware off``): the level search scored without training;
- ``darwinlm training-aware``: the same search schedule, each candidate briefly LoRA-trained
  (``--train-tokens-per-stage``) before it is scored;
- for context, ``uniform (wanda_sp db)``: the same uniform vector from a Wanda-sp database
  (structures ranked by Wanda-sp, remaining weights not updated).

All runs share one calibration set (wikitext2 valid, ``--nsamples`` random windows of
``--seqlen`` tokens) and therefore one OBS level database (built once, its cost counted by
the first run). Every result is then scored on held-out wikitext2 test (``--heldout-windows``
x ``--heldout-seqlen``), fine-tuned with the *same* short LoRA recovery run (``--lora-steps``
steps of ``--lora-seqlen`` tokens from wikitext2 valid, seed 0) and scored again.

    python benchmarks/darwinlm.py --write
    python benchmarks/darwinlm.py --sparsities 0.3 --generations 2 --offspring 2 --lora-steps 2  # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import floats, md_table, write_section  # noqa: E402
from _runs import MODEL  # noqa: E402

from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.loop import run_search  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/darwinlm")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--tokens-per-stage", default="512,2048")
    ap.add_argument("--survivors-per-stage", default="2,1")
    ap.add_argument("--train-tokens-per-stage", default="1024,2048")
    ap.add_argument("--train-lr", type=float, default=5e-4)
    ap.add_argument("--lora-steps", type=int, default=40)
    ap.add_argument("--lora-seqlen", type=int, default=512)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="write the darwinlm section of docs/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = dict(model=MODEL, space="levels", calib="wikitext2", sampling="random", nsamples=args.nsamples,
                  seqlen=args.seqlen, seed=args.seed)
    search = dict(method="darwinlm", generations=args.generations, offspring=args.offspring,
                  tokens_per_stage=args.tokens_per_stage, survivors_per_stage=args.survivors_per_stage)

    def run(name, **kw):
        res = run_search(SearchConfig.build(**common, **kw), work / name, progress=False)
        print(f"  {name}: loss {res['calib_loss']:.4f} evals {res['evaluations']} tl {res['token_layers']:.3g} "
              f"({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return res

    runs = []  # (label, sparsity, run name, result)
    for s in floats(args.sparsities):
        tag = f"{int(round(s * 100))}"
        for label, name, kw in (
                ("uniform", f"uniform_{tag}", dict(method="uniform")),
                # budget_evals 0: the same schedule as the training-aware run, not one-shot's default budget
                ("darwinlm one-shot", f"oneshot_{tag}", dict(**search, training_aware=False, budget_evals=0.0)),
                ("darwinlm training-aware", f"ta_{tag}",
                 dict(**search, training_aware=True, train_tokens_per_stage=args.train_tokens_per_stage,
                      train_lr=args.train_lr)),
                ("uniform (wanda_sp db)", f"uniform_wsp_{tag}", dict(method="uniform", database="wanda_sp"))):
            runs.append((label, s, name, run(name, sparsity=s, **kw)))

    from evoprune.data.sources import get_text
    from evoprune.evaluate.perplexity import perplexity, tokenize_text
    from evoprune.finetune import LoRAConfig, finetune_lora, train_documents
    from evoprune import load_model
    from evoprune.runner.pruned import load_run_model

    dense = load_model(MODEL, progress=False)
    ids = tokenize_text(dense.tokenizer, get_text("wikitext2", "eval"))
    docs = train_documents("wikitext2")

    def ppl(lm) -> float:
        return perplexity(lm.model, ids=ids, seqlen=args.heldout_seqlen, max_windows=args.heldout_windows,
                          progress=False).ppl

    dense_ppl = ppl(dense)
    del dense
    lora = LoRAConfig(steps=args.lora_steps, seqlen=args.lora_seqlen, lr=args.lora_lr, seed=0)
    rows, table = [], {}
    for label, s, name, res in runs:
        memo = work / f"{name}.recovery.json"
        if memo.exists():
            rec = json.loads(memo.read_text())
        else:
            lm = load_run_model(work / name, progress=False)
            before = ppl(lm)
            t = time.time()
            stats = finetune_lora(lm, docs, lora)
            rec = {"before": before, "after": ppl(lm), "lora_s": time.time() - t, "loss_first": stats["loss_first"],
                   "loss_last": stats["loss_last"]}
            memo.write_text(json.dumps(rec))
            del lm
        table[(label, s)] = rec
        db = res["levels_db"]
        cost = f"{res['token_layers']:.3g}" + (" (incl. db)" if db.get("built_by_this_run") else "")
        rows.append([label, f"{s:.0%}", f"{res['param_sparsity']:.3f}", f"{res['params'] / 1e6:.2f}M",
                     f"{res['calib_loss']:.3f}", f"{rec['before']:.2f}", f"{rec['after']:.2f}",
                     f"{rec['before'] / rec['after']:.2f}x", res["evaluations"], cost, f"{res['wall_s']:.0f}"])
        print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    verdicts = []
    for s in floats(args.sparsities):
        one, ta = table.get(("darwinlm one-shot", s)), table.get(("darwinlm training-aware", s))
        if one and ta:
            verdicts.append(f"- {s:.0%}: after recovery, training-aware {ta['after']:.2f} vs one-shot "
                            f"{one['after']:.2f} ({'training-aware better' if ta['after'] < one['after'] else 'one-shot better or equal'}); "
                            f"before recovery {ta['before']:.2f} vs {one['before']:.2f}; recovery gain "
                            f"{ta['before'] / ta['after']:.2f}x vs {one['before'] / one['after']:.2f}x.")
    db0 = runs[0][3]["levels_db"]
    body = ("### DarwinLM: uniform, one-shot and training-aware level search, before/after LoRA (SmolLM2-135M)\n\n"
            f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid (shared; also "
            f"the OBS database's Hessians: {db0['token_layers']:.3g} token-layers, {db0['build_s']:.0f} s, built "
            f"once). Search: {args.generations} generations (the uniform start + {args.generations - 1} of "
            f"{args.offspring} offspring), fitness tokens per stage {args.tokens_per_stage}, survivors "
            f"{args.survivors_per_stage}, level-switch mutation (joint budget). Training-aware: LoRA r=8, lr "
            f"{args.train_lr:g}, {args.train_tokens_per_stage} training tokens per stage (windows of wikitext2 "
            f"valid sharing no 16-token sequence with the calibration set); one-shot: the same schedule "
            f"untrained. Recovery: the same LoRA run for every model ({args.lora_steps} steps x "
            f"{args.lora_seqlen} tokens of wikitext2 valid, r=8, lr {args.lora_lr:g}, seed 0). Held-out: "
            f"wikitext2 test, {args.heldout_windows} windows x {args.heldout_seqlen} tokens; dense ppl "
            f"{dense_ppl:.2f}. Calib fitness: the search's last-stage fitness (training-aware: after its brief "
            f"training, so not comparable with the others). Search cost: token-layers (a training token counts 3 per block) and wall seconds "
            f"on this 2-core machine (shared with other benchmark processes: compare token-layers).\n\n"
            + md_table(["method", "target", "param sparsity", "params", "calib fitness", "ppl before", "ppl after LoRA",
                        "recovery", "evals", "search token-layers", "search s"], rows)
            + "\n\nIs the claim \"training-aware selection finds models that recover better\" borne out here?\n\n"
            + "\n".join(verdicts) + "\n")
    print(body)
    if args.write:
        write_section("darwinlm", body)


if __name__ == "__main__":
    main()
