"""GPU acceptance check (issue 17): the CUDA paths on SmolLM2-135M, in one go, under 10 minutes on one GPU.

Run through ``benchmarks/gpu_check.sh`` (which refuses a machine without a GPU). Steps, each timed and each
failing loudly (a non-zero exit and the step's name):

1. ``search`` on ``--device cuda`` in bf16 and fp32: layers ``evo`` (defaults), width ``evo``
   (``--generations 3``), levels ``darwinlm`` one-shot (``--no-training-aware``, ``--generations 3``);
   each run's peak GPU memory (``torch.cuda.max_memory_allocated``) beside the planner's prediction for
   the same configuration (``evoprune.plan.make_plan``);
2. ``bench`` on CUDA (prefill latency, decode tokens/s, peak memory) of the bf16 layers run;
3. Ray: a layers run with one GPU actor (``--ray-address`` of a local head, ``--workers 1``) and with two
   actors sharing the GPU (``--workers 2 --gpus-per-worker 0.5``); their history equals the sequential run's;
4. ``--device-map auto`` (accelerate places the model) on the same search: same result as without;
5. a sparse-checkpoint cache on CUDA (``--cache-every 4 --cache-device cpu``): same losses as the full cache.

``--write`` puts the table into the ``gpu-check`` section of docs/RESULTS.md. ``--smoke`` runs the same
steps on the CPU with the bundled model and tiny budgets (no CUDA memory, no GPU actors): a check of this
script itself, for machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

GIB = 2 ** 30
CALIB = dict(sampling="random", nsamples=4, seqlen=512, calib="wikitext2", seed=0)


class CheckFailed(RuntimeError):
    pass


def step(rows: list, name: str, fn):
    t0 = time.time()
    try:
        out = fn()
    except Exception as e:  # every failure names its step
        raise CheckFailed(f"gpu_check: step '{name}' failed: {type(e).__name__}: {e}") from e
    rows.append([name, f"{time.time() - t0:.1f}", out])
    print(f"ok  {name} ({time.time() - t0:.1f} s): {out}", flush=True)
    return out


def _search(out: Path, device: str, **kw) -> tuple[dict, int]:
    """A search in this process; returns its result and the peak GPU memory it allocated (0 on CPU)."""
    import torch

    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res = run_search(SearchConfig.build(device=device, **kw), out, progress=False)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return res, peak


def _planned(device: str, **kw) -> int:
    from evoprune.plan import make_plan, meta_model, resolve_config
    from evoprune.runner.config import SearchConfig

    cfg = SearchConfig.build(device=device, **kw)
    config, _ = resolve_config("smollm2-135m")
    return make_plan(cfg, meta_model(config, cfg.model.dtype), tflops=100, gpus=1)["placement"]["per_worker_bytes"]


def _history(run: Path) -> list:
    return [{k: r[k] for k in ("pattern", "loss", "eval_token_layers")}
            for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny budgets: check this script without a GPU")
    ap.add_argument("--work", default=None, help="run directories go here (default: a temporary directory)")
    a = ap.parse_args()
    import torch

    device = "cpu" if a.smoke else "cuda"
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); this check needs a "
              "GPU", file=sys.stderr)
        return 2
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check_"))
    small = dict(generations=2) if a.smoke else dict(generations=3)
    calib = {**CALIB, "nsamples": 2, "seqlen": 128} if a.smoke else CALIB
    rows: list = []
    mem_rows: list = []
    layer_kw = dict(method="evo", drop_count=6, **calib)
    cases = [("layers evo", layer_kw),
             ("width evo", dict(space="width", method="evo", sparsity=0.3, **calib, **small)),
             ("levels darwinlm one-shot", dict(space="levels", method="darwinlm", sparsity=0.3, training_aware=False,
                                               **calib, **small))]
    for dtype in ("bfloat16", "float32"):
        for name, kw in cases:
            def run(name=name, kw=kw, dtype=dtype):
                res, peak = _search(work / f"{name.split()[0]}_{dtype}", device, dtype=dtype, **kw)
                planned = _planned(device, dtype=dtype, **kw)
                mem_rows.append([f"{name}, {dtype}", f"{planned / GIB:.3f}", f"{peak / GIB:.3f}",
                                 f"{planned / peak:.2f}" if peak else "-"])
                return f"loss {res['calib_loss']:.4f}, {res['evaluations']} evaluations, {res['wall_s']:.0f} s"
            step(rows, f"search {name} {dtype} on {device}", run)

    def bench():
        out = subprocess.run([sys.executable, "-m", "evoprune.cli", "bench", str(work / "layers_bfloat16"),
                              "--device", device, "--dtype", "bfloat16", "--repeats", "2" if a.smoke else "5"],
                             capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return json.dumps({k: v for k, v in r.items() if not isinstance(v, (dict, list, str))})[:300]
    step(rows, f"bench on {device}", bench)

    ref_kw = dict(method="sleb", drop_count=3, **calib)
    ref, _ = _search(work / "sleb_ref", device, **ref_kw)

    def ray_runs():
        gpu = {} if a.smoke else {"gpus_per_worker": 0.5}
        _search(work / "sleb_ray2", device, workers=2, **gpu, **ref_kw)
        if _history(work / "sleb_ray2") != _history(work / "sleb_ref"):
            raise RuntimeError("--workers 2 history differs from the sequential run's")
        one = {} if a.smoke else {"gpus_per_worker": 1.0}
        _search(work / "sleb_ray1", device, workers=1, ray_address="local", **one, **ref_kw)
        if _history(work / "sleb_ray1") != _history(work / "sleb_ref"):
            raise RuntimeError("one-actor history differs from the sequential run's")
        return "histories equal the sequential run's"
    step(rows, "Ray: one GPU actor, and two actors at --gpus-per-worker 0.5", ray_runs)

    def device_map():
        res, _ = _search(work / "sleb_map", device, device_map="auto", **ref_kw)
        if abs(res["calib_loss"] - ref["calib_loss"]) > 1e-3 * abs(ref["calib_loss"]):
            raise RuntimeError(f"loss {res['calib_loss']} != {ref['calib_loss']}")
        return f"loss {res['calib_loss']:.5f} (without: {ref['calib_loss']:.5f})"
    step(rows, "--device-map auto", device_map)

    def sparse():
        _search(work / "sleb_sparse", device, cache_every=4, cache_device="cpu", **ref_kw)
        a_, b_ = _history(work / "sleb_ref"), _history(work / "sleb_sparse")
        worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a_, b_))
        if len(a_) != len(b_) or worst > 1e-5:
            raise RuntimeError(f"losses differ (max relative {worst:.2e})")
        return f"max relative loss difference {worst:.1e}"
    step(rows, "--cache-every 4 --cache-device cpu", sparse)

    t1 = md_table(["step", "s", "result"], rows)
    t2 = md_table(["run", "planned GiB (per worker)", "measured peak GiB", "planned / measured"], mem_rows)
    print(t1, t2, sep="\n\n")
    if a.write and not a.smoke:
        name = torch.cuda.get_device_name(0)
        write_section("gpu-check", f"### GPU acceptance check on {name} (issue 17)\n\n{t1}\n\nPlanned vs measured "
                                   f"GPU memory (`torch.cuda.max_memory_allocated`):\n\n{t2}\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as e:
        print(str(e), file=sys.stderr)
        sys.exit(1)
