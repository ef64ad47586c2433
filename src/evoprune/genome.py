"""Genomes: immutable, hashable pruning decisions with a stable string key.

Owns the value types every search works on. Pure Python (no torch, no numpy
required to build one), so the search core can stay torch-free.

- ``DropPattern``: which decoder blocks (0-based indices) are removed from an
  ``n_layers``-block model. Invariant: indices are unique, sorted, in
  ``[0, n_layers)``, and at least one block is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

__all__ = ["DropPattern", "GenomeError", "parse_layer_list", "replace"]


class GenomeError(ValueError):
    """A genome that violates its invariants (bad index, duplicate, all dropped)."""


def parse_layer_list(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """Parse ``"3,13"`` (or a sequence of ints, or ``None``/``""``) into a tuple of ints.

    Duplicates and ordering are preserved so the caller can validate them.
    """
    if text is None:
        return ()
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return tuple(int(p) for p in parts)
        except ValueError as e:
            raise GenomeError(f"layer list must be comma-separated integers, got {text!r}") from e
    return tuple(int(x) for x in text)


@dataclass(frozen=True, order=True)
class DropPattern:
    """A set of dropped decoder blocks of an ``n_layers``-block model.

    ``dropped`` is normalised to a sorted tuple on construction; construction
    fails with :class:`GenomeError` on out-of-range or repeated indices, or when
    every block would be dropped.
    """

    n_layers: int
    dropped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if int(self.n_layers) < 1:
            raise GenomeError(f"n_layers must be >= 1, got {self.n_layers}")
        raw = tuple(int(i) for i in self.dropped)
        if len(set(raw)) != len(raw):
            dups = sorted({i for i in raw if raw.count(i) > 1})
            raise GenomeError(f"layer index repeated: {dups}")
        bad = [i for i in raw if not 0 <= i < self.n_layers]
        if bad:
            raise GenomeError(
                f"layer index out of range: {bad} (model has {self.n_layers} layers, valid 0..{self.n_layers - 1})"
            )
        if len(raw) >= self.n_layers:
            raise GenomeError(f"cannot drop every layer ({self.n_layers} of {self.n_layers})")
        object.__setattr__(self, "dropped", tuple(sorted(raw)))

    @classmethod
    def from_mask(cls, mask: Iterable[int | bool]) -> "DropPattern":
        """Build from a 0/1 mask of length ``n_layers`` (1 = dropped)."""
        m = [bool(x) for x in mask]
        return cls(len(m), tuple(i for i, x in enumerate(m) if x))

    @property
    def k(self) -> int:
        """Number of dropped blocks."""
        return len(self.dropped)

    @property
    def kept(self) -> tuple[int, ...]:
        """Indices of kept blocks, ascending."""
        d = set(self.dropped)
        return tuple(i for i in range(self.n_layers) if i not in d)

    @property
    def mask(self) -> tuple[int, ...]:
        """0/1 tuple of length ``n_layers`` (1 = dropped)."""
        d = set(self.dropped)
        return tuple(int(i in d) for i in range(self.n_layers))

    @property
    def first_dropped(self) -> int:
        """Index of the first dropped block (``n_layers`` when nothing is dropped)."""
        return self.dropped[0] if self.dropped else self.n_layers

    @property
    def sparsity(self) -> float:
        """Fraction of blocks dropped, in [0, 1)."""
        return self.k / self.n_layers

    @property
    def key(self) -> str:
        """Stable key, e.g. ``"L30:d3,13"``; equal patterns have equal keys."""
        return f"L{self.n_layers}:d" + ",".join(map(str, self.dropped))

    def __str__(self) -> str:
        return self.key
