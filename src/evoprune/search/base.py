"""The ``Strategy`` contract every search method implements (ask/tell, resumable, self-describing).

Owns :class:`Strategy`, the base class with the bookkeeping shared by all
methods (pending candidates, fitness memo, best-so-far, generation counter,
JSON state), :class:`NoOptions` and :func:`drive` (run a strategy against a
Python fitness function). Pure Python + numpy; no torch.

Contract (lower fitness is better; fitness is a mean NLL or KL):

- ``ask()`` returns the candidates still to be evaluated, each at most once per
  strategy (a fitness memo keyed by the genome's ``key`` means a genome scored
  earlier is never requested again). It is idempotent: calling it again before
  ``tell`` returns the same list and consumes no randomness. It returns ``[]``
  only when ``done``.
- ``tell(candidates, fitnesses)`` reports fitnesses for any subset of the
  outstanding candidates (so a resumed run can replay logged evaluations in
  pieces); the strategy advances once every outstanding candidate is scored.
  NaN is treated as +inf (worst). Telling an unasked or already-told
  candidate raises ``ValueError``.
- ``generation`` counts completed rounds (:attr:`Strategy.round_name`: EPPS
  generations, SLEB steps, exhaustive/random batches); ``best`` is the
  lowest-fitness *feasible* genome told so far (ties: the earliest) or ``None``.
- ``state_dict()`` is JSON-serializable (including the generator's
  ``bit_generator.state``); ``load_state_dict()`` on a strategy constructed
  with the same space and options continues identically to an uninterrupted
  run. A mismatching method, space or option value raises ``ValueError``;
  options that only one side knows (a field added or removed since the state
  was saved) are not compared.

What a strategy declares, so that the runner never branches on method names:

- ``config_cls``: its frozen options dataclass, which owns the defaults and the
  validation; fields with ``metadata={"cli": False}`` are internal knobs, fields
  named in ``inputs`` are filled by the runner (e.g. one-shot ``scores``);
- ``needs``: what the runner must supply: ``"scores"`` (one-shot per-layer
  scores of the space: Block Influence, OWL outlier ratios) passed as the
  ``scores`` option, ``"operator"`` (an LLM operator, constructor argument),
  ``"training"`` (candidates briefly trained before scoring);
  :meth:`requirements` may drop some for a given config;
- :meth:`check`: refuse a configuration before any expensive setup;
- :meth:`result_extras`: fields the method adds to ``result.json``; :meth:`origin_of`: which of its
  operators made a candidate (a history row's ``origin``).

Randomness only from the ``np.random.Generator`` given to the constructor.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..spaces import SearchError

__all__ = ["Strategy", "NoOptions", "OneShot", "Selection", "drive", "encode_fitness", "decode_fitness"]


@dataclasses.dataclass(frozen=True)
class Selection:
    """How a method's candidates are selected, as the runner needs to know it (read by the method from its own
    options, :meth:`Strategy.selection`): the fidelity stages (``tokens_per_stage``: ``None`` for one stage,
    ``"auto"`` or tokens per stage), the survivors of each stage (``None``: the method has none), how many
    stages its training data must match, and whether full-fidelity candidates are raced."""

    tokens_per_stage: tuple | str | None = None
    survivors: tuple[int, ...] | None = None
    n_stages: int = 1
    races: bool = False


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


def encode_fitness(x: float) -> float | str:
    # Strict JSON has no Infinity; keep non-finite fitness as a string.
    return x if math.isfinite(x) else repr(x)


def decode_fitness(x: float | str) -> float:
    return float(x)


def _json_roundtrip(obj: Any) -> Any:
    # default=: some bit generators (e.g. MT19937) keep numpy arrays in their state.
    return json.loads(json.dumps(obj, default=lambda o: o.tolist()))


class Strategy:
    """Base class: subclasses implement ``_propose`` and ``_advance``.

    Subclass hooks:

    - ``_propose() -> list``: the candidates of the current round
      (may repeat memoised patterns; the base filters them out).
    - ``_advance()``: called when every candidate of the round has a fitness
      (look them up with :meth:`fitness_of`); updates the method's state and
      sets ``self._done`` when finished. ``generation`` is incremented before.
    - ``_extra_state()`` / ``_load_extra_state(d)``: the method's own state.
    - ``config``: a frozen dataclass of options (compared on resume).
    """

    name: ClassVar[str] = "?"  # set by registry.register, as is space_kind
    space_kind: ClassVar[str] = "layers"
    config_cls: ClassVar[type] = NoOptions
    inputs: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()
    round_name: ClassVar[str] = "generation"
    # calibration options the method was published with, used where the user sets none (``CalibOptions``
    # holds the defaults every other method was measured with)
    calibration: ClassVar[dict[str, Any]] = {}

    def __init__(self, space, rng: np.random.Generator, **options: Any) -> None:
        if getattr(space, "kind", None) != self.space_kind:
            raise SearchError(f"method {self.name} searches --space {self.space_kind}, got a "
                              f"{getattr(space, 'kind', type(space).__name__)} space")
        if not isinstance(rng, np.random.Generator):
            raise SearchError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.space = space
        self.rng = rng
        self.config = self._make_config(options)
        self.generation = 0
        self.n_evaluations = 0
        self._done = False
        self._memo: dict[str, float] = {}
        self._pending: list = []
        self._best: tuple[str, float] | None = None

    # -- declarations (see the module docstring) ----------------------------------------

    @classmethod
    def requirements(cls, config) -> frozenset[str]:
        """What the runner must supply for this ``config`` (default: :attr:`needs`)."""
        return cls.needs

    @classmethod
    def check(cls, space, config) -> None:
        """Raise :class:`SearchError` for a configuration that cannot run on ``space``, before any setup."""

    @classmethod
    def selection(cls, config) -> Selection:
        """The :class:`Selection` of options ``config`` (default: the staged options' names where the method
        has them; a method whose options mean something else overrides this)."""
        stages = getattr(config, "tokens_per_stage", None)
        n = getattr(config, "n_stages", None)
        return Selection(tokens_per_stage=stages, survivors=getattr(config, "survivors", None),
                         n_stages=n if isinstance(n, int) else 1, races=bool(getattr(config, "race_margin", 0)))

    def result_extras(self) -> dict:
        """Fields this method adds to ``result.json`` (default: none)."""
        return {}

    def race_of(self, candidate) -> dict | None:
        """Racing of an asked candidate: ``{"refs": keys, "rank": r, "margin": nats/token}`` (see
        :class:`~evoprune.fitness.racing.Race`; the references are genomes already scored on the same
        data) or ``None``. Default: the fields of a :class:`~evoprune.search.staged.Request`."""
        refs = getattr(candidate, "refs", ())
        return {"refs": refs, "rank": candidate.rank, "margin": candidate.margin} if refs else None

    def default_budget(self, stage_tokens: tuple[int, ...]) -> int | None:
        """Token-layer budget of a run given none (``stage_tokens``: the tokens of each fidelity stage's data
        slice, the last = the whole calibration set); ``None``: unbounded."""
        return None

    def origin_of(self, genome) -> str | None:
        """Which operator made ``genome`` (logged as the history row's ``origin``), or ``None`` when the method
        does not say."""
        return None

    @classmethod
    def _make_config(cls, options: dict[str, Any]):
        valid = [f.name for f in dataclasses.fields(cls.config_cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise SearchError(
                f"unknown option(s) {', '.join(unknown)} for method {cls.name} (valid: {', '.join(valid) or 'none'})"
            )
        return cls.config_cls(**options)

    # -- public contract -----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done

    @property
    def best(self) -> tuple[Any, float] | None:
        return None if self._best is None else (self.space.from_key(self._best[0]), self._best[1])

    def fitness_of(self, p: Any) -> float | None:
        """Memoised fitness of ``p`` or ``None`` if it was never told."""
        return self._memo.get(p.key)

    def ask(self) -> list:
        while not self._pending and not self._done:
            fresh, seen = [], set()
            for p in self._propose():
                if p.key not in self._memo and p.key not in seen:
                    seen.add(p.key)
                    fresh.append(p)
            if fresh:
                self._pending = fresh
            else:  # every proposal is already scored: the round completes at once
                self._finish_round()
        return list(self._pending)

    def tell(self, candidates: Sequence, fitnesses: Sequence[float]) -> None:
        keys, fits = self._checked_tell(candidates, fitnesses, [p.key for p in self._pending], lambda p: p.key)
        for p, f in zip(candidates, fits):
            self._memo[p.key] = f
            self.n_evaluations += 1
            self._update_best(p, f)
        told = set(keys)
        self._pending = [p for p in self._pending if p.key not in told]
        if not self._pending:
            self._finish_round()

    @staticmethod
    def _checked_tell(candidates: Sequence, fitnesses: Sequence[float], outstanding: Sequence,
                      ident: Callable[[Any], Any]) -> tuple[list, list[float]]:
        """The checks every ``tell`` makes: as many fitnesses as candidates, no candidate twice, only
        outstanding ones (by ``ident``). Returns the candidates' ids and the fitnesses with NaN -> +inf."""
        candidates, fitnesses = list(candidates), list(fitnesses)
        if len(candidates) != len(fitnesses):
            raise SearchError(f"tell got {len(candidates)} candidates but {len(fitnesses)} fitnesses")
        ids = [ident(c) for c in candidates]
        if len(set(ids)) != len(ids):
            raise SearchError("tell got the same candidate twice")
        pending = set(outstanding)
        stray = [i for i in ids if i not in pending]
        if stray:
            raise SearchError(f"tell got candidates that are not outstanding (not asked, or already told): {stray}")
        fits = [float(f) for f in fitnesses]
        return ids, [math.inf if math.isnan(f) else f for f in fits]

    def _tell_requests(self, candidates: Sequence, fitnesses: Sequence[float], pending: list, last: int,
                       low: dict, low_key: Callable[[Any], str]) -> list:
        """``tell`` of multi-stage requests (:class:`~evoprune.search.staged.Request`, outstanding in ``pending``):
        last-stage fitnesses go to the memo (and the best), lower stages to ``low[low_key(request)]``.
        Returns the requests of ``pending`` not told yet."""
        ids, fits = self._checked_tell(candidates, fitnesses, [(r.key, r.stage) for r in pending],
                                       lambda r: (getattr(r, "key", None), getattr(r, "stage", None)))
        for r, f in zip(candidates, fits):
            self.n_evaluations += 1
            if r.stage == last:
                self._memo[r.key] = f
                self._update_best(r.pattern, f)
            else:
                low[low_key(r)] = f
        told = set(ids)
        return [r for r in pending if (r.key, r.stage) not in told]

    def _update_best(self, p: Any, f: float) -> None:
        # Strict '<' keeps the earliest of equal-fitness patterns.
        if self.space.feasible(p) and (self._best is None or f < self._best[1]):
            self._best = (p.key, f)

    def _finish_round(self) -> None:
        self.generation += 1
        self._advance()

    # -- state -----------------------------------------------------------------------

    def _options_dict(self) -> dict:
        return _json_roundtrip(dataclasses.asdict(self.config))

    def state_dict(self) -> dict:
        """JSON-serializable snapshot; see the module docstring."""
        return {
            "method": self.name,
            "space": self.space.to_dict(),
            "options": self._options_dict(),
            "rng": _json_roundtrip(self.rng.bit_generator.state),
            "generation": self.generation,
            "n_evaluations": self.n_evaluations,
            "done": self._done,
            "memo": {k: encode_fitness(v) for k, v in self._memo.items()},
            "pending": [p.key for p in self._pending],
            "best": None if self._best is None else [self._best[0], encode_fitness(self._best[1])],
            "extra": self._extra_state(),
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a :meth:`state_dict`; the strategy must have the same method, space and options.

        Raises ``ValueError`` (:class:`SearchError`) on a mismatch or a malformed
        state; after a malformed-state error the strategy is half-loaded and must
        be discarded.
        """
        if not isinstance(d, dict):
            raise SearchError(f"corrupted search state (expected a JSON object, got {type(d).__name__})")
        for field, mine in (("method", self.name), ("space", self.space.to_dict())):
            if d.get(field) != mine:
                raise SearchError(f"state was saved with {field}={d.get(field)!r}, this search has {field}={mine!r}")
        saved, mine = d.get("options"), self._options_dict()
        if not isinstance(saved, dict) or any(saved[k] != v for k, v in mine.items() if k in saved):
            raise SearchError(f"state was saved with options={saved!r}, this search has options={mine!r}")
        try:
            self._load(d)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise SearchError(f"corrupted search state ({type(e).__name__}: {e})") from e

    def _load(self, d: dict) -> None:
        bg = self.rng.bit_generator
        if d["rng"].get("bit_generator") != bg.state.get("bit_generator"):
            raise SearchError(
                f"state was saved with a {d['rng'].get('bit_generator')} generator, this one is {bg.state.get('bit_generator')}"
            )
        bg.state = d["rng"]
        self.generation = int(d["generation"])
        self.n_evaluations = int(d["n_evaluations"])
        self._done = bool(d["done"])
        self._memo = {self.space.from_key(k).key: decode_fitness(v) for k, v in d["memo"].items()}
        self._pending = [self.space.from_key(k) for k in d["pending"]]
        self._best = None if d["best"] is None else (d["best"][0], decode_fitness(d["best"][1]))
        self._load_extra_state(d["extra"])

    # -- subclass hooks ------------------------------------------------------------------

    def _propose(self) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _advance(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, d: dict) -> None:
        pass


class OneShot(Strategy):
    """A method that proposes one genome (:meth:`_genome`), then is done."""

    def _genome(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _propose(self) -> list:
        return [self._genome()]

    def _advance(self) -> None:
        self._done = True


def drive(
    strategy: Strategy,
    fitness: Callable[[Any], float],
    max_rounds: int | None = None,
) -> tuple[Any, float] | None:
    """Run ``strategy`` to completion (or ``max_rounds`` ask/tell rounds) with a Python fitness.

    For tests and toy problems; the real runner evaluates candidates on a model.
    """
    rounds = 0
    while not strategy.done and (max_rounds is None or rounds < max_rounds):
        cands = strategy.ask()
        if not cands:
            break
        strategy.tell(cands, [fitness(p) for p in cands])
        rounds += 1
    return strategy.best
