"""One protocol, one leaderboard: every space and method at its defaults, ranked on the same held-out windows.

SmolLM2-135M. Budgets: a share of the blocks' attention + MLP parameters (layers: ``k = round(s * 30)`` blocks,
the same parameters). Calibration: 4 x 512 tokens of wikitext2 valid, random windows of the run's seed (every
method of a seed scores on the same set). Held-out: wikitext2 test and c4, ``--heldout-windows`` x 512 tokens
each, of each model as ``evoprune ppl RUN`` loads it (reconstructed weights included). Size: the pruned model's
parameters (``result.json``). Search cost: token-layers as each run counts them (a finer run includes the block
search it ran first; a level run the level database, charged whether or not it built it).

Cases (``--methods``, names ``space:method``; variants after a ``+``; ``@s``: at budget ``s`` only):

- layers: ``shortgpt``, ``sleb``, ``evop``, ``evo``;
- sublayers: ``evo`` (starts from layers ``evo``), ``greedy``;
- width: ``uniform`` (Wanda-sp), ``uniform+taylor`` (LLM-Pruner), ``owl``, ``evo``, ``self-pruner`` (the LLM
  operator: llama.cpp's server on the bundled SmolLM2-135M-Instruct GGUF, started only when such a run is not
  found finished), each search also ``+none`` (``--reconstruct none``: the published update-free setting);
- levels: ``uniform`` (structured OBS), ``darwinlm`` (one-shot; starts from layers ``evo``).

A finished run with the same configuration is reused from ``--work`` or any ``--reuse`` directory (a layers
``evo`` run also from a finer run's ``RUN/blocks`` of the same protocol), so re-runs only add what is missing.
Writes the RESULTS section ``leaderboard`` and ``docs/figures/leaderboard_front.png`` (held-out ppl against
parameters, Pareto front marked, via ``evoprune compare``).

    python benchmarks/leaderboard.py --budgets 0.2,0.3,0.5 --seeds 0 --write
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, floats, md_table, write_section  # noqa: E402
from _runs import MODEL, Heldout, charged_token_layers  # noqa: E402

import torch  # noqa: E402

from evoprune.report.compare import compare_runs  # noqa: E402
from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.loop import run_search  # noqa: E402

ALL = ("layers:shortgpt", "layers:sleb", "layers:evop", "layers:evo", "sublayers:evo", "sublayers:greedy",
       "width:uniform", "width:uniform+taylor", "width:owl", "width:evo", "width:evo+none", "width:self-pruner",
       "width:self-pruner+none", "levels:uniform", "levels:darwinlm")
VARIANTS = {"taylor": {"importance": "taylor"}, "none": {"reconstruct": "none"}}
LABELS = {"layers:shortgpt": "ShortGPT", "layers:sleb": "SLEB", "layers:evop": "EvoP (EPPS)", "layers:evo": "evo",
          "sublayers:evo": "evo (from layers evo)", "sublayers:greedy": "greedy", "width:uniform": "uniform Wanda-sp",
          "width:uniform+taylor": "LLM-Pruner (uniform, Taylor)", "width:owl": "OWL", "width:evo": "evo",
          "width:evo+none": "evo, --reconstruct none", "width:self-pruner": "Self-Pruner (llama.cpp operator)",
          "width:self-pruner+none": "Self-Pruner, --reconstruct none", "levels:uniform": "uniform (structured OBS)",
          "levels:darwinlm": "darwinlm one-shot (from layers evo)"}
FIGURE = RESULTS.parent / "figures" / "leaderboard_front.png"
OPERATOR = "smollm2-135m"  # the alias the local llama.cpp server answers as


def config(case: str, sparsity: float, seed: int, operator: tuple[str, str] = ("http://127.0.0.1/v1", OPERATOR),
           ) -> SearchConfig:
    """The case's search config (``operator``: the LLM operator's url and model; the url is not part of a case)."""
    space, _, rest = case.partition(":")
    method, _, variant = rest.partition("+")
    kw = dict(model=MODEL, calib="wikitext2", sampling="random", nsamples=4, seqlen=512, seed=seed, space=space,
              method=method, sparsity=sparsity, **VARIANTS.get(variant, {}))  # layers: k = round(s * 30)
    if method == "self-pruner":
        kw.update(operator_url=operator[0], operator_model=operator[1])
    if space == "levels" and method == "darwinlm":
        kw["training_aware"] = False
    return SearchConfig.build(**kw)


def _stale(out: Path, run: Path) -> bool:
    """``out`` (a measurement of ``run``'s model) is missing, or older than the run's result (the case re-ran; a
    model that is no run, the dense one, never goes stale)."""
    result = Path(run) / "result.json"
    return not out.exists() or (result.exists() and out.stat().st_mtime < result.stat().st_mtime)


def zeroshot(model: str, out: Path, limit: int) -> float:
    """``evoprune eval MODEL --limit N`` over the seven local tasks (reused from ``out`` unless stale): the mean
    accuracy."""
    if _stale(out, Path(model)):
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "evoprune.cli", "eval", model, "--limit", str(limit), "--out", str(out)],
                       check=True, capture_output=True, env={**os.environ, "EVOPRUNE_NO_PROGRESS": "1"})
    return float(json.loads(out.read_text())["mean_acc_norm_or_acc"])


def speed(run: Path, out: Path) -> dict:
    """``evoprune bench RUN`` (reused from ``out`` unless stale): the pruned model's tok/s and speedups."""
    if _stale(out, run):
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "evoprune.cli", "bench", str(run), "--out", str(out)], check=True,
                       capture_output=True, env={**os.environ, "EVOPRUNE_NO_PROGRESS": "1"})
    b = json.loads(out.read_text())
    pruned = next(r for r in b["rows"] if r["name"] == "pruned")
    return {"decode tok/s": pruned["decode_tok_s"], "prefill tok/s": pruned["prefill_tok_s"],
            "decode speedup": b["speedup"]["decode"], "prefill speedup": b["speedup"]["prefill"],
            "ideal speedup": b["ideal_speedup"]}


def recovery(args, work: Path, rows: list, heldout: Heldout) -> str:
    """The default recovery recipe on the best run (both) of each space at the ``--recover`` budgets."""
    table = []
    for b in floats(args.recover):
        best: dict = {}
        for r in sorted((r for r in rows if abs(r["budget"] - b) < 1e-9), key=_both):
            best.setdefault(r["space"], r)
        for space, r in sorted(best.items(), key=lambda kv: _both(kv[1])):
            out = work / "recovered" / f"{Path(r['run']).name}_{round(100 * b)}_{args.recover_steps}x256"
            if _stale(out / "finetune.json", Path(r["run"])):
                subprocess.run([sys.executable, "-m", "evoprune.cli", "finetune", r["run"], "--data", "wikitext2",
                                "--steps", str(args.recover_steps), "--seqlen", "256", "--out", str(out),
                                "--overwrite"], check=True, capture_output=True,
                               env={**os.environ, "EVOPRUNE_NO_PROGRESS": "1"})
            record = (out / "finetune.json").read_text()
            stats = json.loads(record)["stats"]
            # keyed by the finetune's record too: a re-run of a case's search re-trains into the same directory
            tag = hashlib.sha1(record.encode()).hexdigest()[:12]
            m = {**heldout.of(out, f"recovered:{out}:{tag}:{args.heldout_windows}"), "loss": stats["loss"],
                 "teacher": stats.get("teacher", "-"), "wall_s": stats["wall_s"]}
            print(f"  recovered {space} {LABELS[r['case']]}: {m}", file=sys.stderr, flush=True)
            after = math.sqrt(m["wikitext2"] * m["c4"])
            table.append([f"{round(100 * b)}%", space, LABELS[r["case"]], f"{r['h']['wikitext2']:.2f}",
                          f"{r['h']['c4']:.2f}", f"{_both(r):.2f}", f"{m['wikitext2']:.2f}", f"{m['c4']:.2f}",
                          f"{after:.2f}", f"{m['loss']} ({m['teacher']})", f"{m['wall_s']:.0f}"])
    return (f"Recovery, the same recipe for each space's best run (both) at that budget: `evoprune finetune RUN --data "
            f"wikitext2 --steps {args.recover_steps} --seqlen 256` (defaults: --loss auto = kd+lm from the dense "
            "model, LoRA r 8); held-out as above:\n\n"
            + md_table(["budget", "space", "best run", "wikitext2 before", "c4 before", "both before",
                        "wikitext2 after", "c4 after", "both after", "loss (teacher)", "train s"], table))


def _both(r: dict) -> float:
    """Geometric mean of a row's held-out wikitext2 and c4 perplexity."""
    return math.sqrt(r["h"]["wikitext2"] * r["h"]["c4"])


def seeds_summary(rows: list[dict], args) -> str:
    """Per budget and case, over the seeds: mean (each seed) of calib loss, held-out ppl, both and token-layers,
    cases ranked by their mean of both."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault((r["budget"], r["case"]), []).append(r)

    def cell(vals, fmt):
        return f"{fmt.format(sum(vals) / len(vals))} ({' / '.join(fmt.format(v) for v in vals)})"

    table = []
    for (budget, case), rs in sorted(cases.items(), key=lambda kv: (kv[0][0], sum(map(_both, kv[1])) / len(kv[1]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        table.append([f"{round(100 * budget)}%", rs[0]["space"], LABELS[case], ", ".join(str(r["seed"]) for r in rs),
                      cell([r["res"]["calib_loss"] for r in rs], "{:.4f}"),
                      cell([r["h"]["wikitext2"] for r in rs], "{:.2f}"), cell([r["h"]["c4"] for r in rs], "{:.2f}"),
                      cell([_both(r) for r in rs], "{:.2f}"),
                      cell([r["tl"] for r in rs], "{:.3g}")])
    return (f"Seeds {args.seeds}: each seed draws its own calibration set (4 x 512 wikitext2 valid); held-out "
            f"wikitext2 test / c4, {args.heldout_windows} x 512 tokens each, the same for every row; cases ranked "
            "by their mean of both (the geometric mean of the two perplexities); cells: mean (each seed).\n\n"
            + md_table(["budget", "space", "method (defaults)", "seeds", "calib loss", "wikitext2 ppl", "c4 ppl",
                        "both", "token-layers"], table))


def _record(cfg: SearchConfig | dict) -> dict:
    """What makes two runs the same case: all but execution options, the operator's address (a free port) and
    options without effect (the sensitivity rounds' threshold when there are none)."""
    d = {k: v for k, v in (cfg if isinstance(cfg, dict) else cfg.to_dict()).items() if k not in ("execution",
                                                                                                "evoprune_run")}
    if d.get("operator"):
        d["operator"] = {**d["operator"], "url": None}
    mo = d.get("method_options") or {}
    if mo.get("probe") == 0 and "probe_gain" in mo:  # no sensitivity rounds: their threshold changes nothing
        d["method_options"] = {**mo, "probe_gain": None}
    return d


def find_finished(cfg: SearchConfig, dirs: list[Path]) -> Path | None:
    """A finished run of ``cfg`` in ``dirs`` (also a finer run's ``blocks`` whose parent has ``cfg``'s calibration)."""
    want = _record(cfg)
    for d in dirs:
        for conf in sorted(d.glob("*/config.json")) + sorted(d.glob("*/blocks/config.json")):
            run = conf.parent
            if not (run / "result.json").exists():
                continue
            got = _record(json.loads(conf.read_text()))
            if run.name == "blocks":
                parent = json.loads((run.parent / "config.json").read_text())
                got["calibration"] = {**got["calibration"], "calib_from": None}
                if parent["calibration"] != got["calibration"]:
                    continue
            if got == want:
                return run
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/leaderboard")
    ap.add_argument("--reuse", default="bench_runs/finer_spaces,bench_runs/width_reconstruct",
                    help="other work directories whose finished runs of the same configuration are reused")
    ap.add_argument("--budgets", default="0.2,0.3,0.5")
    ap.add_argument("--seeds", default="0", help="seeds at every budget")
    ap.add_argument("--methods", default=",".join(ALL))
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--bench", default="", help="budgets whose runs also get prefill / decode speed vs dense, e.g. "
                    "0.3 (`evoprune bench`, its default shape: 512-token prefill, 32 decoded tokens, median of 3)")
    ap.add_argument("--zeroshot", default="", help="budgets whose runs (and the dense model) also get lm-eval "
                    "zero-shot accuracy on the seven local tasks (`evoprune eval`), e.g. 0.3")
    ap.add_argument("--zeroshot-limit", type=int, default=50, help="documents per task (default: %(default)s)")
    ap.add_argument("--recover", default="", help="budgets whose best run of each space is also recovered with "
                    "the default recipe (`evoprune finetune RUN --data wikitext2`, --loss auto: kd+lm from the dense "
                    "model, LoRA defaults, --recover-steps x 256 tokens), e.g. 0.3")
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--write", action="store_true", help="write the section into docs/RESULTS.md and the figure")
    ap.add_argument("--section", default="leaderboard", help="another name writes only a per-case summary over "
                    "the seeds (mean, then each seed) into that RESULTS section, e.g. leaderboard-seeds")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dirs = [work] + [Path(d) for d in args.reuse.split(",") if d]
    heldout = Heldout(args.heldout_windows, memo_path=work / "heldout.json")
    rows, ppl_map, runs = [], {}, []
    servers = contextlib.ExitStack()
    operator: list = []  # (url, model) of the llama.cpp server, started for the first self-pruner run not found

    def started() -> tuple[str, str]:
        if not operator:
            from evoprune.models.loading import gguf_file
            from evoprune.search.llm.server import start_llama_cpp_server

            srv = servers.enter_context(start_llama_cpp_server(gguf_file(MODEL), alias=OPERATOR,
                                                               log_path=work / "llama_server.log"))
            operator.append((srv.url, srv.model))
        return operator[0]
    for s in floats(args.budgets):
        for seed in (int(x) for x in args.seeds.split(",")):
            for spec in args.methods.split(","):
                case, _, only = spec.partition("@")  # space:method@0.3: at that budget only
                if only and abs(float(only) - s) > 1e-9:
                    continue
                cfg = config(case, s, seed)
                name = f"{case.replace(':', '_').replace('+', '_')}_{round(100 * s)}_s{seed}"
                t = time.time()
                found = find_finished(cfg, dirs)
                run = found or work / name
                if not found and cfg.method == "self-pruner":
                    cfg = config(case, s, seed, started())
                res = json.loads((run / "result.json").read_text()) if found else run_search(cfg, run, progress=False)
                link = work / "named" / name  # compare names rows by directory: a reused "blocks" gets its case's
                link.parent.mkdir(exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(run.resolve(), target_is_directory=True)
                h = heldout.of(run, f"{run}:{res['calib_loss']:.6f}:{args.heldout_windows}")
                if s in floats(args.bench):
                    h = {**h, **speed(link, work / "bench" / f"{name}.json")}
                if s in floats(args.zeroshot):
                    h = {**h, "mean acc": zeroshot(str(link), work / "zeroshot" / f"{name}_{args.zeroshot_limit}.json",
                                                   args.zeroshot_limit)}
                tl = charged_token_layers(res)
                print(f"  {name}: {run} loss {res['calib_loss']:.4f} wikitext2 {h['wikitext2']:.2f} c4 {h['c4']:.2f} "
                      f"tl {tl:.3g} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
                rows.append({"budget": s, "seed": seed, "space": cfg.space, "case": case, "res": res, "h": h,
                             "tl": tl, "run": str(run)})
                ppl_map[str(link)] = {k: v for k, v in h.items() if k in ("wikitext2", "c4", "decode tok/s")}
                runs.append(str(link))
    servers.close()
    if args.section != "leaderboard":
        body = seeds_summary(rows, args)
        print(body)
        if args.write:
            write_section(args.section, body)
        return
    table, best = [], {}
    for r in sorted(rows, key=lambda r: (r["budget"], _both(r))):
        res = r["res"]
        best.setdefault(r["budget"], r)
        h = r["h"]
        table.append([f"{round(100 * r['budget'])}%", r["space"], LABELS[r["case"]], str(r["seed"]),
                      f"{res['calib_loss']:.4f}", f"{h['wikitext2']:.2f}", f"{h['c4']:.2f}",
                      f"{_both(r):.2f}", f"{res['params'] / 1e6:.2f}M", f"{r['tl']:.3g}", str(res["evaluations"])]
                     + ([f"{h['prefill speedup']:.2f} / {h['decode speedup']:.2f} ({h['ideal speedup']:.2f})"
                         if "decode speedup" in h else "-"] if args.bench else [])
                     + ([f"{h['mean acc']:.3f}" if "mean acc" in h else "-"] if args.zeroshot else []))
    body = (f"Calibration 4 x 512 wikitext2 valid (random windows, seeds {args.seeds}); held-out wikitext2 test / c4, "
            f"{args.heldout_windows} x 512 tokens each; both: their geometric mean (the ranking: a model must hold up "
            "on text unlike its calibration set); rows by budget, best first. Token-layers: each run's search work "
            "(finer runs include the block search they ran first; levels the database, whether or not the run "
            "built it).\n\n"
            + md_table(["budget", "space", "method (defaults)", "seed", "calib loss", "wikitext2 ppl", "c4 ppl",
                        "both", "params", "token-layers", "evaluations"]
                       + (["speedup prefill / decode (ideal)"] if args.bench else [])
                       + ([f"mean acc (7 tasks, {args.zeroshot_limit} each)"] if args.zeroshot else []), table)
            + "\n\nBest at each budget (both): " + "; ".join(
                f"{round(100 * b)}%: {r['space']} {LABELS[r['case']]} ({_both(r):.2f})" for b, r in sorted(best.items())))
    if args.zeroshot:
        dense = zeroshot(MODEL, work / "zeroshot" / f"dense_{args.zeroshot_limit}.json", args.zeroshot_limit)
        body += (f"\n\nZero-shot: lm-eval on the seven local tasks, the first {args.zeroshot_limit} documents of "
                 f"each (acc_norm where the task has it, else acc); dense {dense:.3f}. With {7 * args.zeroshot_limit} "
                 "documents a mean accuracy has a standard error of about 0.025: smaller differences are noise.")
    if args.recover:
        body += "\n\n" + recovery(args, work, rows, heldout)
    out = work / "compare"
    if out.exists():
        shutil.rmtree(out)
    pj = work / "ppl.json"
    pj.write_text(json.dumps(ppl_map))
    cmp = compare_runs(runs, out, str(pj))
    body += ("\n\nBy wikitext2 alone (`evoprune compare` over these runs): "
             + "; ".join(f"{round(100 * b['budget'])}%: {b['run']} ({b['method']}, {b['wikitext2 ppl']:.2f})"
                         for b in cmp["best"])
             + ". Pareto front, ppl against parameters: " + ", ".join(cmp["front"]["params"]) + ".")
    print(body)
    if args.write:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cmp["front_figure"], FIGURE)
        body += f"\n\n![leaderboard front](figures/{FIGURE.name})"
        write_section("leaderboard", body)


if __name__ == "__main__":
    main()
