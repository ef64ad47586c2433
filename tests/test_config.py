"""One source of truth for options: defaults from the strategies' configs, recipes, plugins, new families, errors."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from evoprune import cli
from evoprune.cli.search import search_config
from evoprune.errors import UserError
from evoprune.options import opt
from evoprune.runner.config import SearchConfig
from evoprune.search import SPACE_KINDS, default_method, get_strategy, methods, register
from evoprune.search.base import Strategy
from evoprune.search.registry import unregister

_BUDGET = {"layers": ["--drop-count", "2"], "width": ["--sparsity", "0.3"], "levels": ["--sparsity", "0.3"],
           "sublayers": ["--drop-count", "4"]}
_NEEDS = {"self-pruner": ["--operator-url", "http://127.0.0.1:9/v1", "--operator-model", "m"]}


def _parse(*argv):
    return cli.build_parser().parse_args(["search", *argv, "--out", "unused"])


@pytest.mark.parametrize("space,method", [(s, m) for s in SPACE_KINDS for m in methods(s)])
def test_every_strategy_gets_its_own_defaults_from_the_cli(space, method):
    args = _parse("--space", space, "--method", method, *_BUDGET[space], *_NEEDS.get(method, []))
    cfg = search_config(args)
    assert cfg.method == method and cfg.method_options == get_strategy(method, space).config_cls()


def test_defaults_are_the_strategies_and_the_best_method():
    assert (default_method("layers"), default_method("width"), default_method("levels")) == ("evo", "evo", "darwinlm")
    evo = search_config(_parse("--drop-count", "6")).method_options
    # the CLI used to force 10 generations; issue 16: two auto stages, racing, a derived budget
    assert cfg_is(evo, generations=20, offspring=16, survivors=(6, 2), tokens_per_stage="auto", race_margin=0.05,
                  budget_share=0.135)
    assert cfg_is(search_config(_parse("--method", "evop", "--drop-count", "6")).method_options,
                  generations=100, population=20)
    assert cfg_is(search_config(_parse("--space", "levels", "--sparsity", "0.3")).method_options,
                  offspring=8, survivors=(2, 1), tokens_per_stage="auto", race_margin=0.05, generations=None,
                  budget_evals=35.0)
    assert cfg_is(search_config(_parse("--space", "width", "--sparsity", "0.3")).method_options,
                  population=4, mutations=8, crossovers=0, generations=5, probe=1.0, probe_rounds=4,
                  tokens_per_stage="auto", promote=2)


def cfg_is(options, **want) -> bool:
    return all(getattr(options, k) == v for k, v in want.items())


def test_flags_reach_their_sections():
    cfg = search_config(_parse("--method", "evo", "--drop-count", "6", "--generations", "7", "--tokens-per-stage",
                               "512,2048", "--survivors-per-stage", "4,2", "--no-greedy-seed", "--seqlen", "512",
                               "--nsamples", "4", "--fitness", "kl", "--workers", "2", "--protect-ends"))
    assert cfg_is(cfg.method_options, generations=7, tokens_per_stage=(512, 2048), survivors=(4, 2),
                  greedy_seed=False)
    assert (cfg.calibration.seqlen, cfg.fitness.fitness, cfg.execution.workers) == (512, "kl", 2)
    assert cfg.space_options.protect_ends is True and cfg.budget.k(30) == 6


def test_an_option_of_another_method_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "evoprune.cli", "search", "--method", "sleb", "--drop-count", "2",
                        "--population", "8", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       env={**os.environ, "EVOPRUNE_NO_PROGRESS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--population is not an option of --method sleb" in lines[0]
    assert "evop" in lines[0] and not (tmp_path / "r").exists()


def test_recipe_file_flags_override_and_records_reproduce(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("space: layers\nmethod: evo\nseed: 3\nbudget: {drop_count: 6}\n"
                      "calibration: {sampling: random, nsamples: 4, seqlen: 512}\n"
                      "method_options: {generations: 12, offspring: 8}\ncache_mb: 64\n")
    cfg = search_config(_parse("--config", str(recipe), "--offspring", "6", "--seed", "4"))
    assert cfg_is(cfg.method_options, generations=12, offspring=6) and cfg.seed == 4
    assert (cfg.calibration.nsamples, cfg.calibration.seqlen, cfg.fitness.cache_mb) == (4, 512, 64.0)
    record = tmp_path / "config.json"  # a run's record is a recipe for the same search
    record.write_text(json.dumps({"evoprune_run": 2, **cfg.to_dict()}))
    assert search_config(_parse("--config", str(record))) == cfg
    with pytest.raises(UserError, match="unknown option 'generation'"):
        SearchConfig.from_dict({"method_options": {"generation": 3}, "budget": {"drop_count": 2}})


@pytest.fixture
def first_k():
    """A strategy defined here, in a test: found by the registry with no other file edited."""

    @register("test-first-k", space="layers")
    class FirstK(Strategy):
        @dataclass(frozen=True)
        class Config:
            offset: int = opt(0, "first dropped block")

        config_cls = Config

        def _propose(self):
            from evoprune.spaces import DropPattern

            o = self.config.offset
            return [DropPattern(self.space.n_layers, tuple(range(o, o + self.space.k)))]

        def _advance(self) -> None:
            self._done = True

    yield FirstK
    unregister("test-first-k", "layers")


def test_a_strategy_defined_in_a_test_is_a_method(first_k, tiny_dirs, calib_text, tmp_path, capsys):
    assert "test-first-k" in methods("layers")
    argv = ["search", "--model", str(tiny_dirs["llama"]), "--method", "test-first-k", "--offset", "2",
            "--drop-count", "2", "--calib", f"text:{calib_text}", "--sampling", "random", "--nsamples", "2",
            "--seqlen", "24", "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "test-first-k" and res["dropped_layers"] == [2, 3] and res["evaluations"] == 1
    rec = json.loads((tmp_path / "r" / "config.json").read_text())
    assert rec["method_options"] == {"offset": 2}
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    search = sub.choices["search"]  # an expert knob: parsed, listed by --help-all, not by --help
    assert "--offset" in search._option_string_actions and search._option_string_actions["--offset"].expert


def test_a_new_llama_layout_family_is_one_registration(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evoprune.export import export_width
    from evoprune.models.base import ADAPTERS, Adapter, get_adapter
    from evoprune.models.base import register as register_family
    from evoprune.models.loading import LoadedModel
    from evoprune.prune.importance import compute_importance
    from evoprune.prune.width_plan import plan_widths

    with pytest.raises(ValueError, match="no causal LM"):  # fails at registration, not at export
        register_family("not_a_model_type")(type("Bad", (Adapter,), {}))
    assert "not_a_model_type" not in ADAPTERS

    @register_family("granite")
    @dataclass(frozen=True)
    class GraniteAdapter(Adapter):
        """Granite: the Llama layout (plus scalar multipliers inside the stock modules)."""

    try:
        torch.manual_seed(0)
        config = AutoConfig.for_model("granite", vocab_size=320, hidden_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                      max_position_embeddings=128)
        model = AutoModelForCausalLM.from_config(config).eval()
        lm = LoadedModel(model, None, get_adapter(model), "granite-tiny", "granite-tiny")
        imp, _ = compute_importance(lm, None, metric="magnitude")
        rec = export_width(lm, plan_widths(lm, imp, [0.3, 0.5, 0.0, 1.0]), tmp_path / "exp")
        assert rec["max_abs_diff"] == 0.0 and rec["masked_max_abs_diff"] <= 1e-5
        assert rec["num_kv_groups"] == [1, 1, 2, 0]
        text = (tmp_path / "exp" / "modeling_evoprune_width.py").read_text()
        assert "class EvopruneWidthForCausalLM(GraniteForCausalLM)" in text
    finally:
        ADAPTERS.pop("granite", None)


def test_reading_failures_are_one_line(tmp_path, tiny_dirs, calib_text):
    from evoprune.models.loading import resolve_alias

    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(resolve_alias("smollm2-135m").read_bytes()[:3_000_000])
    afile = tmp_path / "afile"
    afile.write_text("keep")
    env = {**os.environ, "EVOPRUNE_NO_PROGRESS": "1", "EVOPRUNE_CACHE": str(tmp_path / "cache")}
    tiny = str(tiny_dirs["llama"])
    for argv, needle in [
        (["info", "--model", str(trunc)], "cannot read model file"),
        (["export", "--model", tiny, "--drop", "1", "--out", str(afile)], "exists and is not a directory"),
        (["search", "--model", tiny, "--drop-count", "1", "--calib", f"text:{calib_text}", "--sampling", "random",
          "--nsamples", "2", "--seqlen", "24", "--out", str(afile)], "exists and is not a directory"),
        (["finetune", tiny, "--data", f"text:{calib_text}", "--steps", "1", "--out", str(afile)],
         "exists and is not a directory"),
        (["search", "--drop-count", "1", "--config", str(tmp_path / "no-such.yaml"), "--out", str(tmp_path / "r")],
         "No such file or directory"),
        (["resume", str(afile)], "is not a directory"),
    ]:
        r = subprocess.run([sys.executable, "-m", "evoprune.cli", *argv], capture_output=True, text=True, env=env,
                           timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, (argv, r.stderr)
        assert lines[0].startswith("evoprune: error:") and needle in lines[0], (argv, lines[0])
    assert afile.read_text() == "keep"


def test_every_section_owns_its_defaults():
    """No config field is left without a help text, so the generated CLI documents every option."""
    from evoprune.cli.search import search_methods as _methods, search_sections as _sections
    from evoprune.options import options_of

    classes = list(_sections().values()) + [s.config_cls for s in _methods().values()]
    missing = [f"{c.__name__}.{o.field}" for c in classes for o in options_of(c) if o.cli and not o.help]
    assert missing == []
    assert all(dataclasses.is_dataclass(c) and c.__dataclass_params__.frozen for c in classes)


def test_strategy_options_round_trip_the_record():
    cfg = SearchConfig.build(method="evop", drop_count=3, population=8, seed=5)
    again = SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.strategy_options()["population"] == 8
    s = get_strategy("evop")(__import__("evoprune.spaces", fromlist=["x"]).LayerDropSpace(10, 3),
                             np.random.default_rng(0), **again.strategy_options())
    assert s.config == cfg.method_options
