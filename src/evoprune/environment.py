"""The software stack a process runs on: Python, platform, evoprune and the key packages' versions.

Owns :func:`stack` (what ``evoprune info --env`` prints and every run directory's ``env.jsonl`` records
once per start or resume), :func:`read_constraints` and :func:`mismatches` (installed versions against
the repository's ``constraints.txt``, the exact versions CI tests: ``make setup`` installs them,
``make lock`` rewrites them). Cheap and torch-free: versions come from the installed distributions'
metadata (``importlib.metadata``), nothing is imported; torch's CUDA build and visible GPU count are
added only when torch is already imported.
"""
from __future__ import annotations

import platform
import re
import socket
import sys
from importlib import metadata
from pathlib import Path

from .version import __version__

__all__ = ["stack", "KEY_PACKAGES", "checkout_constraints", "read_constraints", "mismatches"]

# distribution names, in the order they are shown
KEY_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "safetensors", "numpy", "scikit-learn",
                "sentence-transformers", "lm-eval", "peft", "ray", "openai", "tensorboard", "wandb",
                "llama-cpp-python")

_UNSET = object()


def _norm(name: str) -> str:
    """PEP 503 normalised name: ``Scikit_Learn`` -> ``scikit-learn``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def checkout_constraints() -> Path | None:
    """``constraints.txt`` of the source checkout this package is imported from (``src/evoprune`` ->
    the repository root); ``None`` for an installed wheel, which has no such file beside it."""
    root = Path(__file__).resolve().parents[2]
    path = root / "constraints.txt"
    return path if path.is_file() and (root / "pyproject.toml").is_file() else None


def read_constraints(path: str | Path) -> dict[str, str]:
    """``{normalised name: pinned version}`` of the ``name==version`` lines of a pip constraints file."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*(\S+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def _matches(installed: str, pinned: str) -> bool:
    """Whether ``installed`` satisfies ``==pinned`` (PEP 440: ``2.13.0+cpu`` satisfies ``==2.13.0``)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion
    except ImportError:  # packaging comes with pip and every build tool; a plain comparison otherwise
        return installed == pinned or ("+" not in pinned and installed.split("+", 1)[0] == pinned)
    try:
        return SpecifierSet(f"=={pinned}").contains(installed, prereleases=True)
    except InvalidVersion:
        return installed == pinned


def mismatches(pins: dict[str, str]) -> list[str]:
    """``"name: installed X, constraints Y"`` for each pinned package installed at another version (a pinned
    package that is not installed is no mismatch: a constraint only applies to what something requires)."""
    out = []
    for name, pinned in sorted(pins.items()):
        have = _installed(name)
        if have is not None and not _matches(have, pinned):
            out.append(f"{name}: installed {have}, constraints {pinned}")
    return out


def _torch_runtime() -> dict:
    """torch's CUDA build and visible GPUs, only when torch is imported already (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "cuda"):
        return {}
    try:
        return {"torch_cuda": torch.version.cuda, "cuda_devices": int(torch.cuda.device_count())}
    except Exception:  # noqa: BLE001 - a broken driver must not stop a run from starting
        return {"torch_cuda": getattr(torch.version, "cuda", None), "cuda_devices": None}


def stack(constraints: str | Path | None | object = _UNSET) -> dict:
    """The stack as a flat JSON-able dict: ``python``, ``platform``, ``host``, ``evoprune``, one key per
    :data:`KEY_PACKAGES` entry (its installed version, ``None`` when absent), ``torch_cuda`` and
    ``cuda_devices`` (only with torch imported), ``constraints`` (the file compared against) and
    ``constraint_mismatches`` (a list; ``None`` without a constraints file).

    ``constraints``: the constraints file to compare with (default: the source checkout's, see
    :func:`checkout_constraints`; ``None``: compare with none).
    """
    path = checkout_constraints() if constraints is _UNSET else constraints
    out = {"python": f"{platform.python_implementation()} {platform.python_version()}",
           "platform": platform.platform(), "host": socket.gethostname(), "evoprune": __version__}
    out.update({name: _installed(name) for name in KEY_PACKAGES})
    out.update(_torch_runtime())
    if path is not None and Path(path).is_file():
        out["constraints"] = str(path)
        out["constraint_mismatches"] = mismatches(read_constraints(path))
    else:
        out["constraints"], out["constraint_mismatches"] = None, None
    return out
