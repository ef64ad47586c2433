"""The pruned model of a finished run, and model specs that may name a run directory.

Owns :func:`load_model` (any model spec, run directories included: the public ``evoprune.load_model``),
:func:`load_run_model` (a run's base model with its best result applied, blocks removed or widths
sliced in place), :func:`run_result` (a run's ``result.json``, or for an unfinished run the best
full-fidelity candidate its last saved state names, marked ``unfinished``), :func:`width_plan` (the :class:`~evoprune.prune.width_plan.WidthPlan` of a width
or levels run) and :func:`apply_sublayers_inplace`. Which kind of result a run has is read off its
``result.json`` (``dropped_layers``, ``dropped_attention`` / ``dropped_mlp``, ``rates``, ``attn_levels``),
so runs of either configuration format work.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, user_input
from .rundir import RunDir, is_run_dir

__all__ = ["load_model", "load_run_model", "run_result", "width_plan", "run_base_model", "base_spec", "is_width_result",
           "is_sublayer_result", "apply_sublayers_inplace"]


def is_width_result(res: dict) -> bool:
    """Whether a run's result is a width-pruned model (per-block attention groups and MLP channels)."""
    return "rates" in res or "attn_levels" in res


def is_sublayer_result(res: dict) -> bool:
    """Whether a run's result drops attention and MLP sub-layers separately (``--space sublayers``)."""
    return "dropped_attention" in res


def apply_sublayers_inplace(lm, attention, mlp) -> None:
    """Remove, for good, the attention of blocks ``attention`` and the MLP of blocks ``mlp`` of the dense ``lm``:
    blocks in both are dropped (``lm.dropped``); the others are sliced to the width format with zero
    attention groups / MLP channels (their output biases zeroed), so the model exports as a
    ``trust_remote_code`` width model, or as a plain HF model when only whole blocks go."""
    from ..models.slicing import apply_width_inplace
    from ..models.sublayers import check_sublayers, zero_output_biases
    from ..prune.width_plan import sublayer_plan

    n = lm.adapter.n_layers(lm.model)
    whole = sorted(set(attention) & set(mlp))
    lm.adapter.drop_inplace(lm.model, whole)
    lm.dropped = tuple(whole)
    new = {b: j for j, b in enumerate(i for i in range(n) if i not in set(whole))}
    a = [new[i] for i in attention if i in new]
    m = [new[i] for i in mlp if i in new]
    if a or m:
        check_sublayers(lm.model)
        zero_output_biases(lm.adapter, lm.adapter.get_blocks(lm.model), a, m)
        apply_width_inplace(lm.model, sublayer_plan(lm, a, m))


def run_base_model(run: RunDir) -> str:
    """The model spec a run searched (either configuration format)."""
    cfg = run.read_config()
    model = cfg.get("model")
    return model.get("model") if isinstance(model, dict) else model


# a history row's fields of each space -> the result fields that name the same pruning
_RESULT_FIELDS = {"dropped": "dropped_layers", "dropped_attention": "dropped_attention", "dropped_mlp": "dropped_mlp",
                  "rates": "rates", "attn_levels": "attn_levels", "mlp_levels": "mlp_levels"}


def run_result(run: RunDir) -> dict | None:
    """``result.json`` of a finished run. Of an unfinished one (in progress, or interrupted): the best
    full-fidelity candidate of its last saved state, as the result fields that say what it prunes, with
    ``calib_loss``, ``evaluations`` and ``unfinished`` (:meth:`RunDir.status`); ``None`` before it has one."""
    res = run.read_result()
    if res is not None:
        return res
    state = run.read_state() or {}
    best = (state.get("strategy") or {}).get("best")
    if not best:
        return None
    key, loss = best[0], float(best[1])
    done = int((state.get("counters") or {}).get("evaluations", 0))
    row = next((r for r in reversed(run.read_history()[:done])
                if r.get("pattern") == key and not r.get("raced") and float(r.get("loss")) == loss), None)
    if row is None:
        return None
    cfg = run.read_config()
    out = {_RESULT_FIELDS[k]: v for k, v in row.items() if k in _RESULT_FIELDS}
    if "attn_levels" in out:
        with user_input("run file (level database record)", run.path / "levels_db.json"):
            out["levels_db"] = json.loads((run.path / "levels_db.json").read_text())
    return {"method": cfg.get("method"), "space": cfg.get("space", "layers"), **out, "calib_loss": loss,
            "evaluations": done, "unfinished": run.status()}


def base_spec(spec: str) -> str:
    """The model spec behind ``spec``: a run directory's base model, else ``spec`` itself."""
    return run_base_model(RunDir(spec)) if is_run_dir(Path(str(spec)).expanduser()) else str(spec)


def load_model(spec: str, *, dtype=None, device="cpu", progress: bool = True, device_map=None):
    """Load ``spec``: a run directory (:func:`load_run_model`) or any spec of
    :func:`evoprune.models.loading.load_pretrained` (alias, ``.gguf``, HF directory, hub id)."""
    import torch

    from ..models.loading import load_pretrained

    if is_run_dir(Path(str(spec)).expanduser()):
        return load_run_model(spec, dtype=dtype, device=device, progress=progress, device_map=device_map)
    return load_pretrained(str(spec), dtype=dtype or torch.float32, device=device, progress=progress,
                           device_map=device_map)


def load_run_model(path, *, dtype=None, device="cpu", progress: bool = True, device_map=None):
    """The base model of a finished run with its best result applied (blocks removed, or widths sliced, in place)."""
    import torch

    from ..models.loading import load_pretrained

    run = RunDir(path)
    res = run_result(run)
    if res is None:
        raise UserError(f"{run.path}: {run.status()}, with no full-fidelity candidate yet")
    lm = load_pretrained(run_base_model(run), dtype=dtype or torch.float32, device=device, progress=progress,
                         device_map=device_map)
    if is_sublayer_result(res):
        apply_sublayers_inplace(lm, res["dropped_attention"], res["dropped_mlp"])
        lm.name = str(path)
        lm.extra["run"] = {"method": res.get("method"), "calib_loss": res.get("calib_loss"), "space": "sublayers",
                           "dropped_attention": list(res["dropped_attention"]), "dropped_mlp": list(res["dropped_mlp"]),
                           **_unfinished(res)}
        return lm
    if is_width_result(res):
        from ..models.slicing import apply_width_inplace

        plan = width_plan(run, lm)
        apply_width_inplace(lm.model, plan)
        lm.name = str(path)
        lm.extra["run"] = {"method": res.get("method"), "calib_loss": res.get("calib_loss"), "space": res.get("space"),
                           "rates": list(plan.rates), "params": res.get("params"), **_unfinished(res)}
        return lm
    dropped = tuple(res.get("dropped_layers", ()))
    lm.adapter.drop_inplace(lm.model, dropped)
    lm.name, lm.dropped = str(path), dropped
    lm.extra["run"] = {"method": res.get("method"), "calib_loss": res.get("calib_loss"), **_unfinished(res)}
    return lm


def _unfinished(res: dict) -> dict:
    return {"unfinished": res["unfinished"], "evaluations": res["evaluations"]} if "unfinished" in res else {}


def width_plan(path, lm):
    """The :class:`~evoprune.prune.width_plan.WidthPlan` of a finished width or levels run, for the unpruned
    base model ``lm``. Width runs: from the rates and ``RUN/importance.pt``; a run with ``--reconstruct ls`` also
    writes its reconstructed output projections into ``lm`` (from the run's ``calib.pt``: one dense pass). Levels
    runs: from the run's level database, whose weights for the chosen levels are also written into ``lm``'s output /
    MLP-output projections. Both in the masked form: slicing ``lm`` by the plan then gives the pruned model."""
    from ..prune.importance import WidthImportance
    from ..prune.width_plan import plan_widths

    run = path if isinstance(path, RunDir) else RunDir(path)
    res = run_result(run)
    if res is not None and "attn_levels" in res:
        return _levels_plan(run, res, lm)
    imp = run.path / "importance.pt"
    if res is None or "rates" not in res or not imp.is_file():
        raise UserError(f"{run.path}: not a width-pruning run with a result (needs rates and importance.pt)")
    plan = plan_widths(lm, WidthImportance.load(imp), res["rates"])
    from .config import SearchConfig

    cfg = SearchConfig.from_dict(run.read_config())
    o = cfg.space_options
    if o.reconstruct == "ls":
        from ..data.calibration import CalibSet
        from ..prune.reconstruct import Reconstruction

        Reconstruction(lm, CalibSet.load(run.calib_path), damp=o.reconstruct_damp,
                       batch_size=cfg.calibration.batch_size, hessian_mb=cfg.execution.hessian_mb).apply_inplace(plan)
    return plan


def _levels_plan(run: RunDir, res: dict, lm):
    from ..prune.levels_db import AppliedLevels, LevelDatabase

    info = res.get("levels_db") or {}
    if not info.get("path") or not (Path(info["path"]) / "levels.json").is_file():
        raise UserError(f"{run.path}: its level database {info.get('path')!r} is gone; rerun the search with the "
                        f"same arguments in a new directory to rebuild it")
    applied = AppliedLevels(lm, LevelDatabase.load(info["path"]))
    applied.apply(res["attn_levels"], res["mlp_levels"])
    return applied.db.plan(res["attn_levels"], res["mlp_levels"], applied.spec)
