"""Architecture rules of ``src/evoprune``, checked on the source with ``ast`` (no imports needed).

- no import cycles among evoprune's modules, counting imports inside functions (dynamic
  ``importlib.import_module`` discovery, as the strategy registry and the lazy package attributes use,
  is not an import statement and does not count);
- ``spaces/`` and ``search/`` import no torch (nor transformers), directly or through other modules;
- nothing outside ``models/`` names a ``transformers`` class or ``model_type``;
- the library never imports the CLI, and no module imports another's private (underscore) names;
- modules stay under 400 lines and functions under 80.

Each check is a function of the source root, so it can be pointed at another tree
(``python -c "from tests.test_architecture import report; print(report('OTHER/src/evoprune'))"``).
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "evoprune"
HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors", "lm_eval", "sentence_transformers", "ray")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``root`` (package ``evoprune``)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = ["evoprune", *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: dict) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement in ``path`` (any depth), resolved to module names:
    an ``evoprune`` module of ``known`` (``from pkg import mod`` counts as ``pkg.mod``) or a top-level external
    package name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name if a.name.split(".")[0] == "evoprune" else a.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "evoprune":
                out.append((mod.split(".")[0], node.lineno))
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno))
    return out


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """``{module: evoprune modules it imports}``."""
    mods = _modules(root)
    return {m: {t for t, _ in _imports(m, f, mods) if t in mods and t != m} for m, f in mods.items()}


def cycles(root: Path = SRC) -> list[list[str]]:
    """The import cycles (strongly connected components of more than one module), each sorted."""
    graph = import_graph(root)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def heavy_imports(root: Path, prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    """``{module under one of prefixes: heavy packages it reaches}`` through evoprune's own imports."""
    mods = _modules(root)
    direct = {m: {t for t, _ in _imports(m, f, mods)} for m, f in mods.items()}
    bad = {}
    for start in (m for m in mods if m.startswith(prefixes)):
        seen, todo, found = {start}, [start], set()
        while todo:
            for t in direct[todo.pop()]:
                if t in mods and t not in seen:
                    seen.add(t)
                    todo.append(t)
                elif t in HEAVY:
                    found.add(t)
        if found:
            bad[start] = found
    return bad


def hf_names_outside_models(root: Path = SRC) -> list[str]:
    """``file:line what`` for every transformers class or ``model_type`` named outside ``models/``."""
    out = []
    for f in sorted(root.rglob("*.py")):
        if f.relative_to(root).parts[0] == "models":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            hit = None
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
                names = [a.name for a in node.names if a.name[:1].isupper()]
                hit = f"imports {', '.join(names)} from transformers" if names else None
            elif isinstance(node, ast.Attribute) and node.attr == "model_type":
                hit = "reads .model_type"
            elif isinstance(node, ast.Constant) and node.value == "model_type":
                hit = "names 'model_type'"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "transformers" and node.attr[:1].isupper():
                hit = f"uses transformers.{node.attr}"
            if hit:
                out.append(f"{f.relative_to(root)}:{node.lineno} {hit}")
    return out


def cli_imports_from_library(root: Path = SRC) -> list[str]:
    """Library modules (outside ``cli/``) that import the CLI."""
    mods = _modules(root)
    return sorted(m for m, deps in import_graph(root).items()
                  if not m.startswith("evoprune.cli") and any(d.startswith("evoprune.cli") for d in deps)
                  and m in mods)


def private_imports(root: Path = SRC) -> list[str]:
    """``file:line name`` for every underscore name imported from another evoprune module."""
    out = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("evoprune")):
                out += [f"{f.relative_to(root)}:{node.lineno} {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def too_long(root: Path = SRC) -> list[str]:
    """Modules over :data:`MAX_MODULE_LINES` lines and functions over :data:`MAX_FUNCTION_LINES`."""
    out = []
    for f in sorted(root.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        n = text.count("\n")
        if n > MAX_MODULE_LINES:
            out.append(f"{f.relative_to(root)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{f.relative_to(root)}:{node.lineno} {node.name}(): {length} lines")
    return out


def report(root: str | Path = SRC) -> dict:
    """Every check's findings for the tree at ``root`` (empty lists: the rules hold)."""
    root = Path(root)
    return {"cycles": cycles(root), "torch in the pure core": heavy_imports(root, ("evoprune.spaces", "evoprune.search")),
            "HF names outside models/": hf_names_outside_models(root), "library imports the CLI":
            cli_imports_from_library(root), "private names across modules": private_imports(root),
            "too long": too_long(root)}


def test_no_import_cycles():
    assert cycles() == []


def test_cycle_detection_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "evoprune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    assert cycles(pkg) == [["evoprune.a", "evoprune.b"]]


def test_spaces_and_search_import_no_torch():
    assert heavy_imports(SRC, ("evoprune.spaces", "evoprune.search")) == {}


def test_hf_classes_and_model_type_only_in_models():
    assert hf_names_outside_models() == []


def test_library_never_imports_the_cli():
    assert cli_imports_from_library() == []


def test_no_private_names_cross_modules():
    assert private_imports() == []


def test_modules_and_functions_stay_short():
    assert too_long() == []


def test_the_runner_reads_no_method_option():
    """The loop and the problems learn what they need of a method (stages, survivors, racing) from its typed
    ``Strategy.selection``; they may hand the options to the strategy, never read a field of them."""
    import re

    bad = []
    for path in [SRC / "runner" / "loop.py", *sorted((SRC / "runner" / "problems").glob("*.py"))]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"method_options\.\w|getattr\([^)]*method_options", line):
                bad.append(f"{path.name}:{i}: {line.strip()}")
    assert bad == []


def test_problems_and_evaluators_meet_the_typed_contract():
    from evoprune.fitness.evaluator import NLLEvaluator
    from evoprune.fitness.levels import LevelEvaluator
    from evoprune.fitness.whole_model import WidthEvaluator
    from evoprune.runner.problems import PROBLEMS, Evaluator, Problem

    def methods(proto):
        return [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]

    assert methods(Problem) == ["prepare", "row", "result", "summary"]
    for cls in PROBLEMS.values():
        assert all(callable(getattr(cls, m, None)) for m in methods(Problem)) and cls.kind and cls.options_cls
    for cls in (NLLEvaluator, WidthEvaluator, LevelEvaluator):
        assert all(callable(getattr(cls, m, None)) for m in methods(Evaluator)), cls


def test_one_staging_implementation():
    """Every method whose options have fidelity stages selects through :class:`StagedStrategy`, and no module but
    ``search/staged.py`` keeps a per-stage fitness memo of its own."""
    import dataclasses
    import re

    from evoprune.search.registry import SPACE_KINDS, get_strategy, methods
    from evoprune.search.staged import StagedStrategy

    staged = []
    for space in SPACE_KINDS:
        for name in methods(space):
            cls = get_strategy(name, space)
            if "tokens_per_stage" in {f.name for f in dataclasses.fields(cls.config_cls)}:
                staged.append(f"{space}:{name}")
                assert issubclass(cls, StagedStrategy), f"{space}:{name}"
    assert {"layers:evo", "sublayers:evo", "width:evo", "width:self-pruner", "levels:darwinlm"} <= set(staged)
    bad = [f"{p.relative_to(SRC)}:{i}" for p in sorted((SRC / "search").rglob("*.py")) if p.name != "staged.py"
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"self\._low\s*(:[^=]*)?=|_screening", line)]
    assert bad == []
