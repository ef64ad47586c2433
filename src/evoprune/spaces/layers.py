"""The layer-drop space: which decoder blocks are removed.

Owns :class:`DropPattern` (an immutable, hashable set of dropped blocks with a
stable key), :func:`parse_layer_list`, :func:`k_from_sparsity` and
:class:`LayerDropSpace` (drop exactly ``k`` of ``n_layers`` decoder blocks, never a
protected one) with its sampling, feasibility check, repair ("double mutation"
in EvoP), enumeration and cost. Pure Python + numpy; no torch.

``DropPattern`` invariant: indices are unique, sorted, in ``[0, n_layers)``, and
at least one block is kept. All randomness comes from an explicit
``np.random.Generator`` argument so a search is reproducible from its seed and
resumable from its generator state.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from .base import GenomeError, SearchError, as_int

__all__ = ["DropPattern", "parse_layer_list", "k_from_sparsity", "LayerDropSpace"]

_DROP_KEY = re.compile(r"L(\d+):d([0-9,]*)")

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


def k_from_sparsity(n_layers: int, sparsity: float) -> int:
    """Number of blocks to drop for a sparsity in (0, 1): ``k = floor(s*N + 0.5)``.

    Round half up (not Python's banker's rounding), with a tiny tolerance so
    that e.g. 0.1 * 30 = 3.0000000000000004 gives 3. Raises :class:`SearchError`
    when ``sparsity`` is outside (0, 1); the resulting ``k`` is validated by
    :class:`LayerDropSpace`.
    """
    s = float(sparsity)
    if not 0.0 < s < 1.0:
        raise SearchError(f"sparsity must be in (0, 1), got {sparsity!r}")
    return int(math.floor(s * n_layers + 0.5 + 1e-9))


@dataclass(frozen=True)
class LayerDropSpace:
    """Drop exactly ``k`` of ``n_layers`` blocks; ``protected`` blocks are never dropped.

    Validated on construction (raises :class:`SearchError`, a ``ValueError``):
    ``n_layers >= 2``; protected indices unique and in ``[0, n_layers)``;
    ``0 < k < n_layers - len(protected)`` (dropping every droppable block would
    leave nothing to search). ``protected`` is normalised to a sorted tuple.
    """

    n_layers: int
    k: int
    protected: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = as_int("n_layers", self.n_layers)
        k = as_int("k", self.k)
        if n < 2:
            raise SearchError(f"n_layers must be >= 2, got {n}")
        prot = tuple(as_int("protected layer", i) for i in self.protected)
        if len(set(prot)) != len(prot):
            raise SearchError(f"protected layer repeated: {sorted(i for i in set(prot) if prot.count(i) > 1)}")
        bad = [i for i in prot if not 0 <= i < n]
        if bad:
            raise SearchError(f"protected layer out of range: {bad} (model has {n} layers, valid 0..{n - 1})")
        n_droppable = n - len(prot)
        if k < 1:
            raise SearchError(f"number of dropped blocks k must be >= 1, got {k}")
        if k >= n_droppable:
            raise SearchError(
                f"k={k} dropped blocks must be fewer than the {n_droppable} droppable blocks "
                f"({n} layers - {len(prot)} protected)"
            )
        object.__setattr__(self, "n_layers", n)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "protected", tuple(sorted(prot)))

    @classmethod
    def from_sparsity(cls, n_layers: int, sparsity: float, protected: Sequence[int] = ()) -> "LayerDropSpace":
        """Space with ``k = k_from_sparsity(n_layers, sparsity)``; see :func:`k_from_sparsity`."""
        return cls(n_layers, k_from_sparsity(n_layers, sparsity), tuple(protected))

    # -- structure -----------------------------------------------------------------

    @property
    def droppable(self) -> tuple[int, ...]:
        """Block indices that may be dropped, ascending."""
        p = set(self.protected)
        return tuple(i for i in range(self.n_layers) if i not in p)

    @property
    def n_droppable(self) -> int:
        return self.n_layers - len(self.protected)

    def size(self) -> int:
        """Number of feasible patterns, ``C(n_droppable, k)``."""
        return math.comb(self.n_droppable, self.k)

    kind = "layers"

    def from_key(self, key: str) -> DropPattern:
        """The pattern with this ``DropPattern.key`` (for state files and history rows)."""
        return DropPattern.from_key(key)  # a GenomeError is a SearchError

    def to_dict(self) -> dict:
        """JSON-serializable description (used to check a resumed run matches)."""
        return {"kind": "layers", "n_layers": self.n_layers, "k": self.k, "protected": list(self.protected)}

    # -- membership ----------------------------------------------------------------

    def feasible(self, p: DropPattern) -> bool:
        """True iff ``p`` is for this model, drops exactly ``k`` blocks, and none protected."""
        return (
            isinstance(p, DropPattern)
            and p.n_layers == self.n_layers
            and p.k == self.k
            and not set(p.dropped) & set(self.protected)
        )

    def cost(self, p: DropPattern) -> float:
        """Fraction of blocks kept (1.0 = dense); proportional to per-token compute."""
        if p.n_layers != self.n_layers:
            raise SearchError(f"pattern is for {p.n_layers} layers, space has {self.n_layers}")
        return len(p.kept) / self.n_layers

    # -- random operators --------------------------------------------------------------

    def sample(self, rng: np.random.Generator) -> DropPattern:
        """Uniformly random feasible pattern (``k`` distinct droppable blocks)."""
        chosen = rng.choice(np.asarray(self.droppable), size=self.k, replace=False)
        return DropPattern(self.n_layers, tuple(int(i) for i in chosen))

    def repair(self, p: DropPattern | Sequence[int], rng: np.random.Generator) -> DropPattern:
        """Make a pattern feasible: EvoP's "double mutation".

        ``p`` is a ``DropPattern`` or a 0/1 mask of length ``n_layers`` (a mask
        may drop every block, which a ``DropPattern`` cannot represent, so
        crossover/mutation output can be passed here directly). Protected
        blocks are un-dropped first; then, while too many blocks are dropped,
        uniformly random dropped ones are restored, and while too few, uniformly
        random kept droppable ones are dropped. A pattern already feasible is
        returned unchanged and consumes no randomness.
        """
        mask = list(p.mask) if isinstance(p, DropPattern) else [int(bool(x)) for x in p]
        if len(mask) != self.n_layers:
            raise SearchError(f"pattern has {len(mask)} layers, space has {self.n_layers}")
        prot = set(self.protected)
        dropped = [i for i, x in enumerate(mask) if x and i not in prot]
        if len(dropped) > self.k:
            # Restore len-k dropped blocks, chosen uniformly at random.
            undo = rng.choice(np.asarray(dropped), size=len(dropped) - self.k, replace=False)
            dropped = sorted(set(dropped) - {int(i) for i in undo})
        elif len(dropped) < self.k:
            d = set(dropped)
            kept = [i for i in self.droppable if i not in d]
            add = rng.choice(np.asarray(kept), size=self.k - len(dropped), replace=False)
            dropped = sorted(d | {int(i) for i in add})
        return DropPattern(self.n_layers, tuple(dropped))

    def enumerate(self) -> Iterator[DropPattern]:
        """All feasible patterns, in lexicographic order of their dropped indices."""
        for combo in itertools.combinations(self.droppable, self.k):
            yield DropPattern(self.n_layers, combo)

