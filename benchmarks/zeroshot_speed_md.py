"""Turn the JSON written by benchmarks/zeroshot_speed.sh into docs/RESULTS.md sections (issue 5).

    bash benchmarks/zeroshot_speed.sh 100 bench_runs/zeroshot
    python benchmarks/zeroshot_speed_md.py bench_runs/zeroshot --limit 100
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

MODELS = [("dense (30 blocks)", "dense"), ("SLEB k=6 [4,13,14,15,16,17]", "sleb"),
          ("EvoP k=6 [8,14,17,18,20,22]", "evop")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--limit", type=int, required=True)
    a = ap.parse_args()
    d = Path(a.dir)
    evals = {key: json.loads((d / f"eval_{key}.json").read_text()) for _, key in MODELS}
    tasks = list(evals["dense"]["tasks"])
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    rows = []
    for name, key in MODELS:
        t = evals[key]["tasks"]
        rows.append([name] + [f"{pct(t[n]['acc'])} / {pct(t[n]['acc_norm'])}" for n in tasks]
                    + [pct(evals[key]["mean_acc"]), f"{evals[key]['seconds']:.0f}"])
    body = (f"### Zero-shot accuracy (issue 5): SmolLM2-135M dense vs 20% layer drop (k=6 of 30)\n\n"
            f"lm-eval {evals['dense'].get('lm_eval_version')}, stock `HFLM` around the in-memory model, offline copies "
            f"of the stock task definitions reading `../shared/data`; 0-shot; **first {a.limit} documents per task** "
            f"(`--limit {a.limit}`, so the standard error is about ±5 points per task). Patterns: the wikitext2-"
            f"calibrated SLEB and EvoP k=6 results of the Tables 2/3 run above. Cells: acc / acc_norm in %; "
            f"winogrande and boolq have no acc_norm in the stock tasks.\n\n"
            + md_table(["model"] + tasks + ["mean acc", "seconds"], rows))
    write_section("zeroshot", body)
    rows = []
    for name, key in MODELS[1:]:
        b = json.loads((d / f"bench_{key}.json").read_text())
        dn, pr = b["rows"][0], b["rows"][1]
        if key == "sleb":
            rows.append(["dense", dn["layers"], f"{dn['params'] / 1e6:.1f} M", f"{dn['prefill_ms']:.0f}",
                         f"{dn['decode_tok_s']:.1f}", f"{dn['peak_mem_bytes'] / 2**20:.0f}", "-", "-", "-"])
        s, i, o = b["speedup"], b["ideal_speedup"], b["speedup_over_ideal"]
        rows.append([name, pr["layers"], f"{pr['params'] / 1e6:.1f} M", f"{pr['prefill_ms']:.0f}",
                     f"{pr['decode_tok_s']:.1f}", f"{pr['peak_mem_bytes'] / 2**20:.0f}",
                     f"{s['prefill']:.3f} / {s['decode']:.3f}", f"{i:.3f}",
                     f"{100 * o['prefill']:.0f}% / {100 * o['decode']:.0f}%"])
    body = (f"### Speed and memory (issue 5): `evoprune bench`, CPU\n\n"
            f"Batch {b['batch']} x {b['seqlen']} prefill tokens; {b['decode_tokens']} greedy decode tokens after a "
            f"{b['prompt_tokens']}-token prompt with KV cache; median of {b['repeats']} after 1 warm-up, dense and pruned "
            f"timed alternately in one process, {b['threads']} threads; memory = {b['mem_method_text']}. Ideal "
            f"speedup = L/(L-k) = 30/24 (block FLOPs). The dense row is the one measured alongside SLEB; the EvoP "
            f"run measured its own dense baseline. GPU path not measured: no GPU was lent to this session.\n\n"
            + md_table(["model", "layers", "params", "prefill ms", "decode tok/s", "peak MiB",
                        "speedup prefill / decode", "ideal", "of ideal"], rows))
    write_section("speed", body)


if __name__ == "__main__":
    main()
