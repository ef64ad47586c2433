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
``tokens_per_stage=None``: one stage, every candidate (probes included) on the whole set. The stages,
promotion and racing are :class:`~evoprune.search.staged.StagedStrategy`'s, the one staging implementation.

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...options import opt
from ...spaces import RateVector, SearchError
from ..defaults import PROBE_GAIN, RACE_MARGIN
from ..registry import register
from ..staged import AUTO, StagedStrategy, stage_tokens_option
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
    probe_gain: float = opt(PROBE_GAIN, "a round moves a layer only when its probe beats the current vector by more "
                                        "than this many nats per token")

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
class WidthEvoStrategy(StagedStrategy):
    """Population search over rate vectors; subclasses replace the operators (``self-pruner``).

    The stages, promotion and racing are :class:`~evoprune.search.staged.StagedStrategy`'s: the parents are
    the population (``survivors`` = (``promote``, K) with a screening stage, else (K,)), always with elitism;
    the sensitivity rounds are cohorts scored on the first stage only, and the initial population (and a
    generation of no more than ``promote`` children) starts at the whole set. A one-stage run hands the
    runner bare genomes, not requests.

    Every candidate has an *origin* (:meth:`origin_of`: ``init``, ``mutation`` or ``crossover``; the
    subclass adds its own), and :attr:`origin_stats` counts per origin the candidates ``evaluated``, those
    that entered the next population (``top_k``) and those that were the best so far when scored
    (``best_so_far``).
    """

    config_cls = WidthEvoConfig
    inputs = ("scores",)
    needs = frozenset({"scores"})
    bare_one_stage = True

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self._origin: dict[str, str] = {}  # key -> origin, for the current cohort
        self.origin_stats: dict[str, dict[str, int]] = {}
        # sensitivity rounds: the current vector, the layers moved so far, rounds done, and whether they are over
        self._base: RateVector | None = None
        self._moved: list[int] = []
        self._rounds = 0
        self._probing = bool(self.config.probe)
        self._due = True  # the next cohort is made by the next ask() (the first: once the LLM operator is attached)

    @property
    def population(self) -> list[RateVector]:
        """The current population, best first (the staged selection's parents)."""
        return self.parents

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
        """``out`` topped up to ``n`` distinct vectors not in ``seen`` / already scored with ``draw()``, all of
        ``origin``."""
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

    def _scored(self, key: str) -> bool:
        """Already scored where it would be asked: the whole set (the initial population, whose first member
        may be the sensitivity rounds' vector, scored on the first stage), or any stage (a child)."""
        return key in self._memo or (self.generation > 0 and f"{key}@0" in self._low)

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

    # -- the staged selection's hooks ----------------------------------------------------
    def _survivors(self) -> tuple[int, ...]:
        k = int(self.config.population)
        return (int(self.config.promote), k) if self.config.n_stages == 2 else (k,)

    @property
    def elitism(self) -> bool:
        return True

    @property
    def max_generations(self) -> int:
        return int(self.config.generations) + 1  # the initial population is generation 0

    def _entry_stage(self, cohort: list) -> int:
        """Probes on the first stage; the initial population, and children no more than ``promote``, on the whole
        set; other children are screened first."""
        if self._probing:
            return 0
        return 0 if self.generation > 0 and len(cohort) > self.survivors[0] else self.last

    def _cohort_of(self, kids: list[RateVector]) -> list[RateVector]:
        self._origin = {g.key: self._origin[g.key] for g in kids}
        return kids

    def _initial_cohort(self) -> list[RateVector]:
        if self._base is not None and self._base.key in self._memo and not self.parents:
            # one stage: the rounds scored their vector on the whole set already; it joins the population
            self.parents = [self._base]
        return self._cohort_of(self._initial(int(self.config.population) - len(self.parents)))

    def _offspring(self) -> list[RateVector]:
        seen = {g.key for g in self.parents}
        c = self.config
        return self._cohort_of(self._mutants(int(c.mutations), seen) + self._crossovers(int(c.crossovers), seen))

    def _parents_chosen(self) -> None:
        kept = {g.key for g in self.parents}
        for g in self.active:
            if g.key in kept:
                self._count(self._origin.get(g.key), "top_k")

    def _next_cohort(self) -> list[RateVector]:
        if self._probing:
            return self._round()
        return self._initial_cohort() if self.generation == 0 else self._offspring()

    def _complete_stage(self) -> None:
        if self._probing:  # a sensitivity round is scored (still generation 0)
            self._end_round()
            self._start(self._next_cohort())
            return
        super()._complete_stage()

    def ask(self) -> list:
        if self._due and not self._done:
            self._due = False
            self._start(self._next_cohort())
        return super().ask()

    # -- sensitivity rounds (see the module docstring) ------------------------------------
    def _end_round(self) -> None:
        """Move the layer whose probe helped most, or end the rounds."""
        base, probes = self.cohort[0], self.cohort[1:]
        self._rounds += 1
        gains = [(self.stage_fitness(p, 0) - self.stage_fitness(base, 0), i) for i, p in enumerate(probes)]
        if not gains or min(gains)[0] >= -float(self.config.probe_gain):
            self._probing = False
            return
        _, j = min(gains)
        probe = probes[j]
        layer = next(i for i, (a, b) in enumerate(zip(probe.rates, self._base.rates)) if a != b)
        try:
            self._base = commit(self.space, probe, layer, self._moved)
        except SearchError:  # nothing left to take the difference: stop moving layers
            self._probing = False
            return
        self._moved.append(layer)
        self._probing = self._rounds < int(self.config.probe_rounds)

    def _round(self) -> list[RateVector]:
        """The current vector and its probes (scored on the first stage)."""
        if self._base is None:
            self._base = self.space.uniform()
        d = float(self.config.probe)
        probes = [p for i in range(self.space.n_layers) if i not in self._moved
                  and (p := probe_of(self.space, self._base, i, d)) is not None]
        self._origin = {self._base.key: "init", **{g.key: "probe" for g in probes}}
        return [self._base] + probes

    # -- state -----------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "origin": dict(self._origin),
                "origin_stats": {k: dict(v) for k, v in self.origin_stats.items()}, "probing": self._probing,
                "base": None if self._base is None else self._base.key, "moved": list(self._moved),
                "rounds": self._rounds, "due": self._due}

    def _load_extra_state(self, d: dict) -> None:
        if "population" in d:
            d = self._staged_fields(d)
        super()._load_extra_state(d)
        self._origin = {str(k): str(v) for k, v in d["origin"].items()}
        self.origin_stats = {str(k): {kk: int(vv) for kk, vv in v.items()} for k, v in d["origin_stats"].items()}
        self._probing = bool(d["probing"])
        self._base = None if d["base"] is None else self.space.from_key(d["base"])
        self._moved = [int(i) for i in d["moved"]]
        self._rounds = int(d["rounds"])
        self._due = bool(d["due"])

    def _staged_fields(self, d: dict) -> dict:
        """A state saved in run format 2 by a width search that kept its own selection fields (``population``,
        ``screening``, unprefixed screening fitnesses, one-stage candidates in ``pending``), in the staged
        selection's fields."""
        cohort, low = list(d["cohort"]), {f"{k}@0": v for k, v in d.get("low", {}).items()}
        screened = bool(cohort) and all(f"{k}@0" in low for k in cohort) and not any(k in self._memo for k in cohort)
        # probes, children being screened, or children screened and not promoted yet: stage 0
        at_first = d["probing"] or d.get("screening") or (self.last and self.generation > 0 and screened)
        stage = 0 if at_first else self.last
        asked = d["requests"] if self.last else [[p.key, 0] for p in self._pending]
        self._pending = []
        self.parents = [self.space.from_key(k) for k in d["population"]]
        requests = []
        for key, st in asked:
            race = self._race_refs(int(st))
            requests.append([key, int(st)] + ([list(race["refs"]), race["rank"], race["margin"]] if race else []))
        return {**d, "parents": d["population"], "active": cohort, "stage": stage, "low": low, "requests": requests,
                "due": not cohort}
