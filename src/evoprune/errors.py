"""User-facing errors.

Owns :class:`UserError`, the one exception type the CLI turns into a single
``evoprune: error: ...`` line on stderr and exit code 2. Anything else that
escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user: a missing path, an unsupported model, an invalid value."""
