"""What every search space shares: its error type and integer checking. Pure Python.

Owns :class:`SearchError` (every invalid search-space or strategy argument; a ``ValueError`` for
library callers and a :class:`~evoprune.errors.UserError` for the CLI's one-line contract),
:class:`GenomeError` (a genome that violates its invariants) and :func:`as_int`.
"""
from __future__ import annotations

import operator

from ..errors import UserError

__all__ = ["SearchError", "GenomeError", "as_int"]


class SearchError(UserError, ValueError):
    """Invalid search-space or strategy argument.

    A ``ValueError`` (the library contract) and a ``UserError`` (so the CLI
    prints one line and exits 2 without extra wrapping).
    """


class GenomeError(SearchError):
    """A genome that violates its invariants (bad index, duplicate, all dropped, malformed key)."""


def as_int(name: str, value) -> int:
    """``value`` as an int (``operator.index``: no floats, no bools); :class:`SearchError` otherwise."""
    if isinstance(value, bool):
        raise SearchError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise SearchError(f"{name} must be an integer, got {value!r}") from None
