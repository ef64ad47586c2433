"""Tensor files: a ``torch.save`` payload tagged with its format, written atomically, read without running code.

Owns :func:`save_tagged` and :func:`load_tagged`, used by every saved tensor value that is not a model
(calibration sets, width importance).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .files import atomic_open

__all__ = ["save_tagged", "load_tagged"]


def save_tagged(path: str | os.PathLike, fmt: str, payload: dict) -> None:
    """``torch.save`` of ``{"format": fmt, **payload}`` (plain tensors, lists, numbers) to ``path``, atomically."""
    with atomic_open(path, "wb") as f:
        torch.save({"format": fmt, **payload}, f)


def load_tagged(path: str | os.PathLike, fmt: str, what: str, build: Callable[[dict], object]):
    """``build(payload)`` of the dict a ``torch.save`` wrote to ``path`` with ``"format": fmt``
    (``weights_only``: no code runs). ``FileNotFoundError`` if absent; ``ValueError`` (one line naming
    ``what``) for a file that is not one, or whose payload ``build`` rejects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != fmt:
            raise ValueError(f"format tag is {obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}")
        return build(obj)
    except Exception as e:  # any unpickling / shape / key error means the same thing to the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a valid evoprune {what} ({msg})") from e
