"""Genomes: immutable, hashable pruning decisions with a stable string key.

Owns the value types every search works on. Pure Python (no torch, no numpy
required to build one), so the search core can stay torch-free.

- ``DropPattern``: which decoder blocks (0-based indices) are removed from an
  ``n_layers``-block model. Invariant: indices are unique, sorted, in
  ``[0, n_layers)``, and at least one block is kept.
- ``RateVector``: a structured width-pruning rate per decoder layer (fraction
  of that layer's prunable parameters removed). Invariant: every rate is a
  finite number in ``[0, 1]``, stored rounded to 5 decimals (the precision the
  Self-Pruner prompts ask for), so equal-looking vectors have equal keys.
- ``LevelVector``: a compression level per decoder block for its attention and
  for its MLP (DarwinLM's search points; what a level removes is defined by a
  level database, :mod:`evoprune.prune.levels_db`). Invariant: two equally long,
  non-empty tuples of non-negative ints.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

__all__ = ["DropPattern", "RateVector", "LevelVector", "GenomeError", "parse_layer_list", "replace"]

RATE_DECIMALS = 5
_DROP_KEY = re.compile(r"L(\d+):d([0-9,]*)")


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

    @classmethod
    def from_key(cls, key: str) -> "DropPattern":
        """Inverse of :attr:`key`; :class:`GenomeError` for anything else."""
        m = _DROP_KEY.fullmatch(key)
        if not m:
            raise GenomeError(f"not a pattern key: {key!r}")
        return cls(int(m.group(1)), tuple(int(x) for x in m.group(2).split(",") if x))

    def __str__(self) -> str:
        return self.key


_RATE_KEY = re.compile(r"W(\d+):([0-9.,]*)")


@dataclass(frozen=True, order=True)
class RateVector:
    """Per-layer width-pruning rates ``rates[i]`` in ``[0, 1]`` (0 = layer intact, 1 = all of its
    attention groups and MLP channels removed). Rounded to :data:`RATE_DECIMALS` on construction;
    raises :class:`GenomeError` for an empty vector, a non-finite or out-of-range rate.
    """

    rates: tuple[float, ...]

    def __post_init__(self) -> None:
        try:
            raw = tuple(float(r) for r in self.rates)
        except (TypeError, ValueError):
            raise GenomeError(f"rates must be numbers, got {self.rates!r}") from None
        if not raw:
            raise GenomeError("a rate vector needs at least one layer")
        bad = [r for r in raw if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
        if bad:
            raise GenomeError(f"rates must be finite and in [0, 1], got {bad[:3]}")
        object.__setattr__(self, "rates", tuple(round(r, RATE_DECIMALS) + 0.0 for r in raw))

    @property
    def n_layers(self) -> int:
        return len(self.rates)

    @property
    def mean(self) -> float:
        """Average rate (the Self-Pruner constraint fixes it to the target sparsity)."""
        return math.fsum(self.rates) / len(self.rates)

    @property
    def key(self) -> str:
        """Stable key, e.g. ``"W3:0.10000,0.20000,0.30000"``."""
        return f"W{self.n_layers}:" + ",".join(f"{r:.{RATE_DECIMALS}f}" for r in self.rates)

    @classmethod
    def from_key(cls, key: str) -> "RateVector":
        m = _RATE_KEY.fullmatch(key)
        if not m:
            raise GenomeError(f"not a rate-vector key: {key!r}")
        rates = tuple(float(x) for x in m.group(2).split(",") if x)
        if len(rates) != int(m.group(1)):
            raise GenomeError(f"rate-vector key {key!r} lists {len(rates)} rates for {m.group(1)} layers")
        return cls(rates)

    def __str__(self) -> str:
        return self.key


_LEVEL_KEY = re.compile(r"V(\d+):a([0-9,]*);m([0-9,]*)")


@dataclass(frozen=True, order=True)
class LevelVector:
    """Per-block compression levels: ``attn[i]`` of block ``i``'s attention, ``mlp[i]`` of its MLP
    (0 = intact). Raises :class:`GenomeError` for empty or unequal tuples or a negative level."""

    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            a, m = tuple(int(x) for x in self.attn), tuple(int(x) for x in self.mlp)
        except (TypeError, ValueError):
            raise GenomeError(f"levels must be integers, got {self.attn!r}, {self.mlp!r}") from None
        if not a or len(a) != len(m):
            raise GenomeError(f"need one attention and one MLP level per block, got {len(a)} and {len(m)}")
        if min(a + m) < 0:
            raise GenomeError(f"levels must be >= 0, got {min(a + m)}")
        object.__setattr__(self, "attn", a)
        object.__setattr__(self, "mlp", m)

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    @property
    def key(self) -> str:
        """Stable key, e.g. ``"V3:a1,0,2;m3,3,2"``."""
        return f"V{self.n_layers}:a" + ",".join(map(str, self.attn)) + ";m" + ",".join(map(str, self.mlp))

    @classmethod
    def from_key(cls, key: str) -> "LevelVector":
        m = _LEVEL_KEY.fullmatch(key)
        if not m:
            raise GenomeError(f"not a level-vector key: {key!r}")
        a = tuple(int(x) for x in m.group(2).split(",") if x)
        b = tuple(int(x) for x in m.group(3).split(",") if x)
        if len(a) != int(m.group(1)):
            raise GenomeError(f"level-vector key {key!r} lists {len(a)} levels for {m.group(1)} blocks")
        return cls(a, b)

    def __str__(self) -> str:
        return self.key
