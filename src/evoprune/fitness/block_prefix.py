"""Shared-prefix hidden states for evaluators that edit every block (width rates, one-shot levels). Torch-free.

Owns :class:`BlockPrefix`: the bookkeeping of a bounded LRU (:class:`~evoprune.fitness.prefix_lru.PrefixLRU`)
whose entry ``(j, (k_0, ..., k_{j-1}))`` holds, per calibration batch, the hidden state entering block ``j`` of
any candidate whose blocks ``0 .. j-1`` have the *block keys* ``k_0 .. k_{j-1}``. A block key is hashable and
says everything block ``i`` computes from: width rates, the numbers of attention groups and MLP channels it
loses (which ones follows from the run's fixed importance); one-shot levels, its attention and MLP levels.
``j == n_layers`` is the final-norm input (a candidate equal in every block runs no block).

A candidate scored on batches ``B`` starts at the deepest cached ``j`` whose entry covers ``B`` (0 when none:
the embeddings) and runs blocks ``j .. n_layers-1``: ``token_layers = tokens(B) x (n_layers - j)``, with the
naive forward's loss (blocks ``< j`` compute exactly what they computed for the candidate that left the entry).
Entries cover the batches their candidates were scored on and grow as later evaluations of the same prefix add
batches (a staged search scores the first batches, then the rest; see
:meth:`~evoprune.fitness.whole_model.WholeModelEvaluator.evaluate`). A hit also refreshes the shallower entries
of the same prefix, so a lineage in use (a parent and its mutants) stays cached. A complete evaluation inserts
the states entering its positions ``> j`` that are multiples of ``every``; ``every`` (:func:`auto_every`) is 1
unless the memory holds fewer than :data:`MIN_CANDIDATES` candidates' worth of entries.

The bookkeeping (keys, order, covered batches) is a pure function of the lookups and inserts; tensors may be
missing (ghosts, ``None``), so a resumed run, a Ray driver and the planner's dry run replay it and report the
sequential run's token-layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

from .prefix_lru import PrefixLRU

__all__ = ["BlockPrefix", "auto_every", "MIN_CANDIDATES"]

MIN_CANDIDATES = 4  # auto_every thins the entries until this many candidates' worth fit


def auto_every(n_layers: int, capacity: int) -> int | None:
    """The smallest ``every`` with ``MIN_CANDIDATES x (n_layers // every)`` entries within ``capacity``;
    ``None`` when not even one entry per candidate fits that often (the cache is then off)."""
    for every in range(1, n_layers + 1):
        if MIN_CANDIDATES * (n_layers // every) <= capacity:
            return every
    return None


@dataclass(frozen=True)
class _Entry:
    batches: frozenset  # batch indices the entry covers (bookkeeping)
    states: dict | None  # batch index -> tensor (missing or None: a ghost, recomputed on use)


class BlockPrefix:
    """LRU bookkeeping of block-prefix states (see the module docstring). ``max_bytes``: memory for entries of
    ``entry_bytes`` each (one state of every calibration token); ``every``: ``None`` = :func:`auto_every`."""

    def __init__(self, n_layers: int, max_bytes: float, entry_bytes: int, every: int | None = None) -> None:
        self.n_layers = int(n_layers)
        self.lru = PrefixLRU(max_bytes, entry_bytes)
        self.every = auto_every(self.n_layers, self.lru.capacity) if every is None else int(every)
        if self.every is None:
            self.lru.capacity = 0
            self.every = self.n_layers
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {every}")

    @property
    def active(self) -> bool:
        return self.lru.capacity > 0

    def positions(self, start: int) -> list[int]:
        """Positions ``> start`` whose entering states a complete evaluation from ``start`` inserts."""
        return [j for j in range(start + 1, self.n_layers + 1) if j % self.every == 0]

    @staticmethod
    def key(j: int, keys: Sequence[Hashable]) -> tuple:
        return (int(j), tuple(keys[:j]))

    def lookup(self, keys: Sequence[Hashable], batches: Sequence[int]) -> tuple[int, tuple | None, dict | None]:
        """``(start, entry key, states)``: the deepest cached prefix of a candidate with block ``keys`` that
        covers ``batches`` (``(0, None, None)`` when none; ``states`` ``None`` when a tensor it needs is
        missing, a ghost). Marks it and its shallower entries as recently used."""
        if len(keys) != self.n_layers:
            raise ValueError(f"need one block key per block ({self.n_layers}), got {len(keys)}")
        self.lru.lookups += 1
        if not self.active:
            return 0, None, None
        need = frozenset(batches)
        for j in range(self.n_layers - self.n_layers % self.every, 0, -self.every):
            key = self.key(j, keys)
            if key in self.lru and need <= self.lru.get(key).batches:
                for i in range(self.every, j, self.every):  # the lineage first: the hit ends most recent
                    shallow = self.key(i, keys)
                    if shallow in self.lru:
                        self.lru.insert(shallow, self.lru.get(shallow))
                entry = self.lru.get(key)
                self.lru.insert(key, entry)
                self.lru.hits += 1
                have = entry.states or {}
                return j, key, (have if all(have.get(b) is not None for b in need) else None)
        return 0, None, None

    def insert(self, keys: Sequence[Hashable], start: int, batches: Sequence[int], states: dict | None) -> None:
        """After a complete evaluation from ``start`` on ``batches``: the states entering :meth:`positions`
        (``states[j][b]`` for batch ``b``; ``None``: ghosts), merged into existing entries, deepest last."""
        if not self.active:
            return
        for j in self.positions(start):
            self.put(self.key(j, keys), batches, None if states is None else states[j])

    def put(self, key: tuple, batches: Sequence[int], states) -> None:
        """Merge ``batches`` (tensors ``states[b]``, or ghosts) into entry ``key``, made most recent."""
        old = self.lru.get(key) if key in self.lru else _Entry(frozenset(), None)
        merged = dict(old.states or {})
        for b in batches:
            merged[b] = None if states is None else states[b]
        self.lru.insert(key, _Entry(old.batches | frozenset(batches), merged))

    def fill(self, key: tuple, states: dict) -> None:
        """Give a ghost entry its recomputed tensors (order and covered batches unchanged)."""
        entry = self.lru.get(key)
        merged = dict(entry.states or {})
        merged.update({b: h for b, h in states.items() if b in entry.batches})
        self.lru.set(key, _Entry(entry.batches, merged))

    def release(self) -> None:
        """Drop every entry's tensors; the bookkeeping stays."""
        for key in self.lru.keys():
            self.lru.set(key, _Entry(self.lru.get(key).batches, None))
