"""Does sub-layer or width pruning buy speed where the model is served? The leaderboard's results in llama.cpp.

For the leaderboard's runs (SmolLM2-135M, seed 0) — layers ``evo`` at 20% and 30%, sub-layers ``evo`` at 20% (an
attention-free and an MLP-free block) and 30%, width ``evo`` and levels ``darwinlm`` at 30% — this script:

1. exports each with ``evoprune export RUN --format gguf --outtype f32``, ``q8_0`` and ``q4_k_m``: the checked
   export, whose record holds llama.cpp's and evoprune's perplexity on the same 2 x 256 held-out wikitext2 tokens;
2. times each against the dense model in llama.cpp, ``evoprune bench RUN --engine llama.cpp --outtype T`` at f16 and
   q8_0 (512-token prefill, 32 decoded tokens, median of ``--repeats``, ``--threads`` threads);
3. puts the speedups beside ``evoprune bench RUN`` (transformers on CPU; the leaderboard's measurement where it has
   one) and the ideal (block FLOPs).

Every CLI result is kept under ``--work`` and reused on re-runs. Writes the RESULTS section ``gguf-engines``.

    python benchmarks/gguf_engines.py --write
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

RUNS = [("layers", 0.2, "layers_evo_20_s0"), ("layers", 0.3, "layers_evo_30_s0"),
        ("sublayers", 0.2, "sublayers_evo_20_s0"), ("sublayers", 0.3, "sublayers_evo_30_s0"),
        ("width", 0.3, "width_evo_30_s0"), ("levels", 0.3, "levels_darwinlm_30_s0")]
ENV = {**os.environ, "EVOPRUNE_NO_PROGRESS": "1"}


def _cli(out: Path, *args: str) -> dict:
    """``evoprune ARGS`` once; its last stdout line (the JSON record) is kept in ``out``."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "evoprune.cli", *args], capture_output=True, text=True, env=ENV)
        if r.returncode != 0:
            raise SystemExit(f"evoprune {' '.join(args)} failed:\n{r.stderr[-2000:]}")
        out.write_text(r.stdout.strip().splitlines()[-1] + "\n")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="bench_runs/leaderboard/named", help="the leaderboard's named run links")
    ap.add_argument("--work", default="bench_runs/gguf_engines")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    work, runs = Path(args.work), Path(args.runs)
    rows, checks = [], []
    for space, budget, name in RUNS:
        run = runs / name
        exp = {}
        for t in ("f32", "q8_0", "q4_k_m"):
            d = work / "export" / f"{name}_{t}"
            exp[t] = _cli(work / "export" / f"{name}_{t}.json", "export", str(run), "--format", "gguf", "--outtype",
                          t, "--out", str(d), "--overwrite")
            (d / exp[t]["file"]).unlink(missing_ok=True)  # the record is what this table needs; files are large
        checks.append([f"{round(100 * budget)}%", space, exp["f32"]["architecture"], str(exp["f32"]["n_layers"]),
                       f"{exp['f32']['evoprune_ppl']:.3f}", f"{exp['f32']['llama_cpp_ppl']:.3f}",
                       f"{exp['f32']['mean_abs_dlogit']:.2e}", f"{exp['q8_0']['llama_cpp_ppl']:.3f}",
                       f"{exp['q8_0']['ppl_ratio']:.4f}", f"{exp['q4_k_m']['ppl_ratio']:.4f}",
                       ", ".join(map(str, exp["q8_0"]["mlp_padded_layers"])) or "-"])
        cpp = {t: _cli(work / "bench" / f"{name}_{t}_t{args.threads}.json", "bench", str(run), "--engine", "llama.cpp",
                       "--outtype", t, "--repeats", str(args.repeats), "--threads", str(args.threads))
               for t in ("f16", "q8_0")}
        lb = Path("bench_runs/leaderboard/bench") / f"{name}.json"
        hf = json.loads(lb.read_text()) if lb.exists() else _cli(work / "bench" / f"{name}_hf.json", "bench", str(run))
        rows.append([f"{round(100 * budget)}%", space, exp["f32"]["architecture"],
                     f"{cpp['f16']['params_ratio']:.3f}", f"{cpp['f16']['ideal_speedup']:.2f}"]
                    + [f"{c['speedup']['prefill']:.2f} / {c['speedup']['decode']:.2f}" for c in cpp.values()]
                    + [f"{hf['speedup']['prefill']:.2f} / {hf['speedup']['decode']:.2f}"]
                    + [f"{cpp['q8_0']['rows'][0]['decode_tok_s']:.1f} / {cpp['q8_0']['rows'][1]['decode_tok_s']:.1f}"])
        print(f"  {name}: done", file=sys.stderr, flush=True)
    body = ("SmolLM2-135M, the leaderboard's seed-0 runs. Check: `evoprune export RUN --format gguf` loads the file in "
            "llama.cpp and scores the same 2 x 256 held-out wikitext2 token ids as evoprune (f32: mean |dlogit| as "
            "well); q8_0 MLP widths are rounded up to multiples of 32 with zero channels.\n\n"
            + md_table(["budget", "space", "GGUF arch", "blocks", "evoprune ppl", "llama.cpp f32 ppl",
                        "f32 mean abs dlogit", "llama.cpp q8_0 ppl", "q8_0 / evoprune", "q4_k_m / evoprune",
                        "q8_0 padded MLPs"], checks)
            + f"\n\nSpeedup pruned / dense (prefill / decode tokens/s; 512-token prefill, 32 decoded tokens after a "
            f"16-token prompt, median of {args.repeats} after a warm-up; llama.cpp {args.threads} threads, "
            "transformers as `evoprune bench` defaults):\n\n"
            + md_table(["budget", "space", "GGUF arch", "params x", "ideal", "llama.cpp f16", "llama.cpp q8_0",
                        "transformers fp32", "q8_0 decode tok/s dense / pruned"], rows))
    print(body)
    if args.write:
        write_section("gguf-engines", body)


if __name__ == "__main__":
    main()
