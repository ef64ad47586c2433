"""``evo`` over rate vectors (``--space width``): sensitivity rounds, then the population loop of
Self-Pruner's Algorithm 1, no LLM.

Owns :class:`WidthEvoConfig` and :class:`WidthEvoStrategy` (the (K + M + S) population loop; ``self-pruner``
subclasses it and replaces the operators). Every candidate is a :class:`~evoprune.spaces.RateVector`
feasible in a :class:`~evoprune.spaces.WidthSpace` (mean rate = the target sparsity).

Sensitivity rounds (``probe`` > 0, ``probe_rounds`` of them; :mod:`.sensitivity`): starting from the uniform
vector, each round scores the current vector and one *probe* per layer (that layer's rate lowered by
``probe``, a measurement, never a result) on the first stage; when the best probe beats the current vector
by more than ``probe_gain`` nats per token, its layer keeps the lowered rate, the layers not moved yet take
the difference, and the next round starts from there; otherwise the rounds end. On SmolLM2-135M (30%,
2 x 256 tokens) four rounds alone reach a lower loss than the old defaults on every seed at 0.2x their
token-layers (docs/RESULTS.md, selection-cost).

Generation 0 is the initial population of ``population`` (K) vectors: after sensitivity rounds, their last
vector and its mutants; without them, uniform, OWL's vector when ``scores`` are given, the rest
:meth:`WidthSpace.sample`. Each later generation makes ``mutations`` (M) children by :meth:`WidthSpace.mutate`
of a binary-tournament parent and ``crossovers`` (S) children by :meth:`WidthSpace.crossover` of two
tournament parents; children already scored or repeated are redrawn (at most ``50 * (M + S)`` draws). The
next population is the best K of parents and children (ties: parents first). ``generations`` (N) counts
offspring generations. Racing (``race_margin`` > 0): a child is scored batch by batch and stopped once its
partial loss is clearly worse than every population member's on the same batches (it could not enter the
population; it is told ``+inf``), see :class:`~evoprune.fitness.racing.Race`.

Staged selection (``tokens_per_stage``, e.g. ``"auto"``: a first slice of 1/8 of the calibration tokens,
then the whole set): the probes are scored on the first slice; the initial population on the
whole set; each later generation's children first on the first slice (stage 0, asked as
:class:`~evoprune.search.staged.Request` objects) and only the best ``promote`` of them (ties: proposal
order) on the whole set (the last stage, raced as above); only those compete for the population.
``tokens_per_stage=None``: one stage, every candidate (probes included) on the whole set.

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...options import opt
from ...spaces import RateVector, SearchError
from ..base import Strategy, decode_fitness, encode_fitness
from ..defaults import RACE_MARGIN
from ..registry import register
from ..staged import AUTO, Request, stage_tokens_option
from .oneshot import owl_rates
from .sensitivity import commit, probe_of

__all__ = ["WidthEvoConfig", "WidthEvoStrategy"]


@dataclass(frozen=True)
class WidthEvoConfig:
    """K, M, S, N of Self-Pruner's Algorithm 1 (defaults scaled for CPU-sized models), mutation step."""

    population: int = opt(4, "population size K")
    mutations: int = opt(8, "mutants per generation M")
    crossovers: int = opt(0, "crossover children per generation S")
    generations: int = opt(5, "offspring generations N")
    step: float = opt(0.05, "largest rate moved between two layers per mutation")
    scores: tuple | None = opt(None, "OWL outlier ratio per layer (supplied by the runner)", cli=False)
    lam: float = opt(0.08, "OWL rate spread lambda of the initial OWL vector", flag="owl_lambda")
    race_margin: float = opt(RACE_MARGIN, "racing: stop a child once it trails every population member by more "
                                          "than this many nats per token still to score (0: off)", legacy=0.0)
    tokens_per_stage: tuple | str | None = opt(
        "auto", "fitness tokens of a screening stage for the probes and children and of the whole set, e.g. 64,512 "
                "(auto: 1/8 of the set, >= 64 tokens, then the whole set; none: everything on the whole set)",
        kind="stages", legacy=None)
    promote: int = opt(2, "children per generation scored on the whole set after the screening stage (the best there; "
                          ">= the children: no screening)")
    probe: float = opt(1.0, "sensitivity rounds: how far a probe lowers one layer's rate (capped at the rate: 1 keeps "
                            "that layer whole; 0: no rounds)", legacy=0.0)
    probe_rounds: int = opt(4, "sensitivity rounds at most (each probes every layer not moved yet and moves the best)")
    probe_gain: float = opt(0.05, "a round moves a layer only when its probe beats the current vector by more than this "
                                  "many nats per token")

    def __post_init__(self) -> None:
        for name in ("population", "generations"):
            if int(getattr(self, name)) < 1:
                raise SearchError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mutations", "crossovers"):
            if int(getattr(self, name)) < 0:
                raise SearchError(f"{name} must be >= 0, got {getattr(self, name)}")
        if int(self.mutations) + int(self.crossovers) < 1:
            raise SearchError("need at least one mutation or crossover per generation")
        if not 0.0 < float(self.step) <= 1.0:
            raise SearchError(f"mutation step must be in (0, 1], got {self.step}")
        if self.scores is not None:
            object.__setattr__(self, "scores", tuple(float(x) for x in self.scores))
        if not (isinstance(self.race_margin, (int, float)) and 0 <= self.race_margin < float("inf")):
            raise SearchError(f"race_margin must be a number >= 0, got {self.race_margin!r}")
        tps = stage_tokens_option(self.tokens_per_stage)
        if tps not in (None, AUTO) and len(tps) > 2:
            raise SearchError(f"--space width has at most two stages (a screening slice, the whole set), got {tps}")
        object.__setattr__(self, "tokens_per_stage", tps)
        if not isinstance(self.promote, int) or isinstance(self.promote, bool) or self.promote < 1:
            raise SearchError(f"promote must be an integer >= 1, got {self.promote!r}")
        if not (isinstance(self.probe, (int, float)) and 0 <= self.probe <= 1):
            raise SearchError(f"probe must be a number in [0, 1], got {self.probe!r}")
        if not isinstance(self.probe_rounds, int) or isinstance(self.probe_rounds, bool) or self.probe_rounds < 1:
            raise SearchError(f"probe_rounds must be an integer >= 1, got {self.probe_rounds!r}")
        if not (isinstance(self.probe_gain, (int, float)) and 0 <= self.probe_gain < float("inf")):
            raise SearchError(f"probe_gain must be a number >= 0, got {self.probe_gain!r}")
        if not 0.0 <= float(self.lam) < 1.0:
            raise SearchError(f"owl lambda must be in [0, 1), got {self.lam}")

    @property
    def n_stages(self) -> int:
        """Selection stages: 2 with a screening slice, else 1."""
        tps = self.tokens_per_stage
        return 1 if tps is None else 2 if tps == AUTO else len(tps)


@register("evo", space="width", default=True)
class WidthEvoStrategy(Strategy):
    """Population search over rate vectors; subclasses replace the operators (``self-pruner``).

    Every candidate has an *origin* (:meth:`origin_of`: ``init``, ``mutation`` or ``crossover``; the
    subclass adds its own), and :attr:`origin_stats` counts per origin the candidates ``evaluated``, those
    that entered the next population (``top_k``) and those that were the best so far when scored
    (``best_so_far``).
    """

    config_cls = WidthEvoConfig
    inputs = ("scores",)
    needs = frozenset({"scores"})

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.population: list[RateVector] = []  # best first
        self._cohort: list[str] = []  # keys proposed this round
        self._origin: dict[str, str] = {}  # key -> origin, for the current cohort
        self.origin_stats: dict[str, dict[str, int]] = {}
        self.last = self.config.n_stages - 1  # the whole-set stage
        self._low: dict[str, float] = {}  # key -> screening-stage fitness (staged runs)
        self._screening = False  # staged: the current round scores the children at stage 0
        # sensitivity rounds: the current vector, the layers moved so far, rounds done, and whether they are over
        self._base: RateVector | None = None
        self._moved: list[int] = []
        self._rounds = 0
        self._probing = bool(self.config.probe)

    # -- operators (overridden by the LLM-driven subclass) ---------------------------
    def _initial(self, k: int) -> list[RateVector]:
        if self._base is not None:  # after sensitivity rounds: their vector and its mutants
            base = self._base
            return self._fill([base], k, lambda: self.space.mutate(base, self.rng, self.config.step), origin="init")
        out = [self.space.uniform()]
        if self.config.scores is not None:
            out.append(owl_rates(self.space, self.config.scores, self.config.lam))
        return self._fill(out, k, lambda: self.space.sample(self.rng), origin="init")

    def _tournament(self) -> RateVector:
        i, j = self.rng.integers(len(self.population), size=2)
        return self.population[min(int(i), int(j))]  # population is sorted best-first

    def _mutants(self, m: int, seen: set) -> list[RateVector]:
        return self._fill([], m, lambda: self.space.mutate(self._tournament(), self.rng, self.config.step), seen,
                          origin="mutation")

    def _crossovers(self, s: int, seen: set) -> list[RateVector]:
        return self._fill([], s, lambda: self.space.crossover(self._tournament(), self._tournament(), self.rng), seen,
                          origin="crossover")

    def _fill(self, out: list[RateVector], n: int, draw, seen: set | None = None, *, origin: str) -> list[RateVector]:
        """``out`` topped up to ``n`` distinct vectors not in ``seen`` / the memo with ``draw()``, all of ``origin``."""
        seen = set() if seen is None else seen
        keep = []
        for g in out:
            if g.key not in seen and not self._scored(g.key) and self.space.feasible(g):
                seen.add(g.key)
                keep.append(g)
        tries = 0
        while len(keep) < n and tries < 50 * max(n, 1):
            tries += 1
            g = draw()
            if g.key not in seen and not self._scored(g.key):
                seen.add(g.key)
                keep.append(g)
        for g in keep[:n]:
            self._origin.setdefault(g.key, origin)
        return keep[:n]

    # -- origins -----------------------------------------------------------------------
    def origin_of(self, genome) -> str | None:
        return self._origin.get(genome.key)

    def _count(self, origin: str | None, what: str) -> None:
        if origin is not None:
            row = self.origin_stats.setdefault(origin, {"evaluated": 0, "top_k": 0, "best_so_far": 0})
            row[what] += 1

    def _update_best(self, p, f: float) -> None:
        before = self._best
        super()._update_best(p, f)
        self._count(self.origin_of(p), "evaluated")
        if self._best is not before:
            self._count(self.origin_of(p), "best_so_far")

    def result_extras(self) -> dict:
        return {"origins": {k: dict(v) for k, v in sorted(self.origin_stats.items())}}

    def race_of(self, genome) -> dict | None:
        """Children (generation >= 1) race the population on the whole set: one clearly worse than every
        member cannot enter it (a screening-stage request is never raced)."""
        m, k = float(self.config.race_margin), int(self.config.population)
        refs = tuple(g.key for g in self.population if self._memo.get(g.key, float("inf")) < float("inf"))
        if not m or self.generation == 0 or len(refs) < k or getattr(genome, "stage", self.last) != self.last:
            return None
        return {"refs": refs, "rank": len(refs), "margin": m}

    # -- staged selection (see the module docstring) ------------------------------------
    def _scored(self, key: str) -> bool:
        """Already scored where it would be asked: the whole set (the initial population, whose first member
        may be the sensitivity rounds' vector, scored on the first stage), or any stage (a child)."""
        return key in self._memo or (self.generation > 0 and key in self._low)

    def _asked(self, kids: list, stage: int) -> list:
        """``kids`` as the runner gets them: genomes in a one-stage run, else :class:`Request` objects."""
        return list(kids) if not self.last else [Request(g, stage) for g in kids]

    def tell(self, candidates, fitnesses) -> None:
        if not self.last:
            return super().tell(candidates, fitnesses)
        # screening fitnesses are keyed by the bare genome key (one screening stage)
        self._pending = self._tell_requests(candidates, fitnesses, self._pending, self.last, self._low,
                                            lambda r: r.key)
        if not self._pending:
            self._finish_round()

    def _finish_round(self) -> None:
        if self._probing:  # a sensitivity round is scored; still generation 0
            self._end_round()
            return
        if self._screening:  # the children are screened: the best go on to the whole set, same generation
            self._screening = False
            return
        super()._finish_round()

    def _fit(self, key: str, stage: int) -> float:
        return self._memo[key] if stage == self.last else self._low[key]

    def _end_round(self) -> None:
        """Move the layer whose probe helped most (see the module docstring), or end the rounds."""
        base, probes = self._cohort[0], self._cohort[1:]
        self._rounds += 1
        self._cohort = []
        gains = [(self._fit(k, 0) - self._fit(base, 0), i) for i, k in enumerate(probes)]
        if not gains or min(gains)[0] >= -float(self.config.probe_gain):
            self._probing = False
            return
        _, j = min(gains)
        probe = self.space.from_key(probes[j])
        layer = next(i for i, (a, b) in enumerate(zip(probe.rates, self._base.rates)) if a != b)
        try:
            self._base = commit(self.space, probe, layer, self._moved)
        except SearchError:  # nothing left to take the difference: stop moving layers
            self._probing = False
            return
        self._moved.append(layer)
        self._probing = self._rounds < int(self.config.probe_rounds)

    def _round(self) -> list:
        """The current vector and its probes, on the first stage."""
        if self._base is None:
            self._base = self.space.uniform()
        d = float(self.config.probe)
        probes = [p for i in range(self.space.n_layers) if i not in self._moved
                  and (p := probe_of(self.space, self._base, i, d)) is not None]
        kids = [self._base] + probes
        self._cohort = [g.key for g in kids]
        self._origin = {self._base.key: "init", **{g.key: "probe" for g in probes}}
        # a vector scored at stage 0 before (a repeat) needs no request: it is filtered by the caller
        return self._asked(kids, 0)

    # -- Strategy hooks ----------------------------------------------------------------
    def _propose(self) -> list:
        c = self.config
        if self.last and self.generation > 0 and self._cohort and all(k in self._low for k in self._cohort):
            # the screened cohort: its best `promote` (ties: proposal order) on the whole set
            order = sorted(range(len(self._cohort)), key=lambda i: (self._low[self._cohort[i]], i))
            self._cohort = [self._cohort[i] for i in order[: int(c.promote)]]
            return self._asked([self.space.from_key(k) for k in self._cohort], self.last)
        if self._probing:
            return self._round()
        if self.generation == 0:
            if self._base is not None and self._base.key in self._memo and not self.population:
                # one stage: the rounds scored their vector on the whole set already; it joins the population
                self.population = [self._base]
            kids = self._initial(int(c.population) - len(self.population))
        else:
            seen = {g.key for g in self.population}
            kids = self._mutants(int(c.mutations), seen) + self._crossovers(int(c.crossovers), seen)
        if not kids:  # nothing new can be drawn: the search has converged
            self._done = True
        self._cohort = [g.key for g in kids]
        self._origin = {g.key: self._origin[g.key] for g in kids}
        self._screening = bool(self.last and self.generation > 0 and kids and int(c.promote) < len(kids))
        return self._asked(kids, 0 if self._screening else self.last)

    def _advance(self) -> None:
        pool = {g.key: g for g in self.population}
        for key in self._cohort:
            pool.setdefault(key, self.space.from_key(key))
        # stable sort: on equal fitness parents (inserted first) stay ahead of children
        order = sorted(pool.values(), key=lambda g: self._memo[g.key])
        self.population = order[: int(self.config.population)]
        kept = {g.key for g in self.population}
        for key in self._cohort:
            if key in kept:
                self._count(self._origin.get(key), "top_k")
        self._cohort = []
        if self.generation > int(self.config.generations):
            self._done = True

    def _extra_state(self) -> dict:
        out = {"population": [g.key for g in self.population], "cohort": list(self._cohort),
               "origin": dict(self._origin), "origin_stats": {k: dict(v) for k, v in self.origin_stats.items()},
               "probing": self._probing, "base": None if self._base is None else self._base.key,
               "moved": list(self._moved), "rounds": self._rounds}
        if self.last:
            out.update(low={k: encode_fitness(v) for k, v in self._low.items()}, screening=self._screening,
                       requests=[[r.key, r.stage] for r in self._pending])
        return out

    def _load_extra_state(self, d: dict) -> None:
        self.population = [self.space.from_key(k) for k in d["population"]]
        self._cohort = list(d.get("cohort", []))
        self._origin = {str(k): str(v) for k, v in d.get("origin", {}).items()}
        self.origin_stats = {str(k): {kk: int(vv) for kk, vv in v.items()} for k, v in d.get("origin_stats", {}).items()}
        self._probing = bool(d.get("probing", False))
        self._base = None if d.get("base") is None else self.space.from_key(d["base"])
        self._moved = [int(i) for i in d.get("moved", [])]
        self._rounds = int(d.get("rounds", 0))
        if self.last:
            self._low = {str(k): decode_fitness(v) for k, v in d["low"].items()}
            self._screening = bool(d["screening"])
            self._pending = [Request(self.space.from_key(k), int(st)) for k, st in d["requests"]]
