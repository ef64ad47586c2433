"""Bounded LRU of hidden states shared by candidates with a common kept prefix.

Owns :class:`PrefixLRU`. An entry ``(j, prefix)`` holds, for every calibration
batch, the hidden state entering block position ``j`` of any pattern whose
dropped blocks below ``j`` are exactly ``prefix`` (a non-empty tuple: with an
empty prefix the state is the dense one, which the dense prefix cache already
holds). Such a pattern can start its forward at ``j`` instead of at its first
dropped block.

The cache's *bookkeeping* (which keys exist, their LRU order, evictions) is a
pure function of the sequence of :meth:`lookup`/:meth:`insert` calls and is
independent of the tensors: an entry may be a *ghost* (key without tensors,
``None``), which the owner materializes on a hit. A resumed run replays the
logged evaluations through the bookkeeping only, so later evaluations find the
same keys and report the same token-layers as an uninterrupted run.

Capacity is counted in entries: ``capacity = floor(max_bytes / entry_bytes)``
(every entry has the same size, ``n_tokens * hidden * bytes``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

__all__ = ["PrefixLRU", "prefix_key"]

Key = tuple[int, tuple[int, ...]]


def prefix_key(j: int, dropped: Sequence[int]) -> Key:
    """The entry key of position ``j`` for a pattern with these dropped blocks."""
    return (int(j), tuple(int(d) for d in dropped if d < j))


class PrefixLRU:
    """LRU map ``(j, prefix) -> per-batch hidden states`` (or ``None`` for a ghost)."""

    def __init__(self, max_bytes: float, entry_bytes: int) -> None:
        if entry_bytes < 1:
            raise ValueError(f"entry_bytes must be >= 1, got {entry_bytes}")
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0, got {max_bytes}")
        self.entry_bytes = int(entry_bytes)
        self.capacity = int(max_bytes // entry_bytes)
        self._d: OrderedDict[Key, Any] = OrderedDict()
        self.hits = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Key) -> bool:
        return key in self._d

    def keys(self) -> list[Key]:
        """Keys from least to most recently used."""
        return list(self._d)

    def lookup(self, n_layers: int, dropped: Sequence[int]) -> tuple[Key, Any] | None:
        """Deepest entry usable by a pattern with ``dropped`` blocks, marked most recently used.

        Searches positions ``j`` from ``n_layers - 1`` down to ``first_dropped + 1``.
        Returns ``(key, value)`` (``value`` ``None`` for a ghost) or ``None``.
        """
        self.lookups += 1
        if not self.capacity or not dropped:
            return None
        f = min(dropped)
        for j in range(n_layers - 1, f, -1):
            key = prefix_key(j, dropped)
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return key, self._d[key]
        return None

    def get(self, key: Key) -> Any:
        """The value of an existing ``key`` (``None`` for a ghost), order unchanged."""
        return self._d[key]

    def set(self, key: Key, value: Any) -> None:
        """Store tensors for an existing key (materializing a ghost) without touching the order."""
        if key in self._d:
            self._d[key] = value

    def insert(self, key: Key, value: Any) -> None:
        """Add or refresh ``key`` as most recently used; evict the least recently used beyond capacity.

        An existing entry keeps its tensors when ``value`` is ``None``.
        """
        if not self.capacity:
            return
        if key in self._d:
            self._d.move_to_end(key)
            if value is not None:
                self._d[key] = value
        else:
            self._d[key] = value
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def insert_run(self, run: Sequence[int], dropped: Sequence[int], states: dict | None) -> None:
        """Insert what one candidate's forward saw: ``run`` its positions that ran (from where the LRU starts),
        ``states[j]`` the per-batch states entering each ``j`` of ``run[1:]`` (``None``: ghosts). The state
        entering kept position ``j`` also enters every dropped position between the previous kept one and ``j``."""
        for prev, j in zip(run, run[1:]):
            value = None if states is None else states[j]
            for pos in [d for d in dropped if prev < d < j] + [j]:
                self.insert(prefix_key(pos, dropped), value)
