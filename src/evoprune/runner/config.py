"""The search configuration: :class:`SearchConfig`, one frozen, validated description of a search, in sections.

Owns :class:`SearchConfig`, :func:`section_classes` (which sections a space and method have) and the
three ways in: ``SearchConfig.build(**flags)`` (flat option names, as the CLI and Python callers give
them), ``SearchConfig.from_dict(d)`` (a run's ``config.json``, a recipe file, or a legacy flat record)
and the constructor (section objects). Torch-free.

Sections and who owns their defaults:

=================  ==================================================================================
``model``          :class:`~evoprune.runner.sections.ModelOptions`
``calibration``    :class:`~evoprune.runner.sections.CalibOptions`
``budget``         :class:`~evoprune.runner.sections.BudgetOptions` (``sparsity`` or ``drop_count``)
``fitness``        :class:`~evoprune.runner.sections.FitnessOptions`
``space_options``  the space's problem (:mod:`evoprune.runner.problems`), e.g. ``LayersOptions``
``method_options`` the strategy's ``config_cls`` (e.g. :class:`~evoprune.search.layers.evo.EvoConfig`)
``operator``       :class:`~evoprune.search.llm.operator.OperatorConfig` (methods that need an LLM)
``training``       :class:`~evoprune.finetune.options.TrainingOptions` (methods that train candidates)
``execution``      :class:`~evoprune.runner.sections.ExecutionOptions` (how it runs; not compared on resume)
=================  ==================================================================================

``method`` defaults to the space's default method (:func:`evoprune.search.default_method`). A run's
``config.json`` is :meth:`SearchConfig.to_dict` plus ``"evoprune_run": 2``: every section with every
value resolved (the method's defaults included), so a run records exactly what it ran. Records of the
flat format (``"evoprune_run": 1``, evoprune before the sections) are read by :func:`from_dict` too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..finetune.options import TrainingOptions
from ..options import options_of, parse_value
from ..search import default_method, get_strategy
from ..search.llm.operator import OperatorConfig
from ..search.registry import SPACE_KINDS
from ..spaces import SearchError
from .problems import PROBLEMS
from .problems.common import check_stages
from .sections import (
    BudgetOptions,
    CalibOptions,
    ExecutionOptions,
    FitnessOptions,
    ModelOptions,
)

__all__ = ["SearchConfig", "section_classes", "flag_table", "EXECUTION_SECTION"]

EXECUTION_SECTION = "execution"
_TOP = ("space", "method", "seed")


def section_classes(space: str, method: str) -> dict[str, type]:
    """The sections of a search of ``method`` over ``space``, in record order."""
    if space not in SPACE_KINDS:
        raise UserError(f"unknown search space {space!r} (choose from {', '.join(SPACE_KINDS)})")
    cls = get_strategy(method, space)
    out = {"model": ModelOptions, "calibration": CalibOptions, "budget": BudgetOptions, "fitness": FitnessOptions,
           "space_options": PROBLEMS[space].options_cls, "method_options": cls.config_cls}
    if "operator" in cls.needs:
        out["operator"] = OperatorConfig
    if "training" in cls.needs:
        out["training"] = TrainingOptions
    out[EXECUTION_SECTION] = ExecutionOptions
    return out


def flag_table(sections: dict[str, type], *, method_inputs: tuple = ()) -> dict[str, tuple[str, Any]]:
    """``{flat option name: (section, Option)}`` over ``sections`` (flags and their aliases, underscores)."""
    out: dict[str, tuple[str, Any]] = {}
    for name, cls in sections.items():
        for o in options_of(cls):
            if name == "method_options" and o.field in method_inputs:
                continue
            for key in (o.flag, *o.aliases):
                out[key] = (name, o)
    return out


def _construct(cls, values: dict, where: str):
    try:
        return cls(**values)
    except TypeError as e:  # a missing required field or an unknown keyword
        raise UserError(f"{where}: {e}") from None
    except (UserError, SearchError) as e:
        raise UserError(_flagged(str(e), cls)) from None


def _flagged(message: str, cls) -> str:
    """``message`` with the option field it begins with (also after a ``"LLM operator: "``-like prefix) named as
    the user gives it, e.g. ``timeout_s must be > 0`` -> ``--operator-timeout-s must be > 0``."""
    head, sep, rest = message.partition(": ")
    for o in options_of(cls):
        flag = "--" + o.flag.replace("_", "-")
        for prefix, text in (("", message), (head + sep, rest) if sep else ("", "")):
            if o.cli and text.startswith(o.field + " "):
                return prefix + flag + text[len(o.field):]
    return message


@dataclass(frozen=True)
class SearchConfig:
    """Everything that determines a search's result, in sections (see the module docstring), plus
    ``execution`` (how it runs), which does not. Validated on construction (:class:`UserError`)."""

    space: str = "layers"
    method: str | None = None
    seed: int = 0
    model: ModelOptions = field(default_factory=ModelOptions)
    calibration: CalibOptions = field(default_factory=CalibOptions)
    budget: BudgetOptions | None = None
    fitness: FitnessOptions = field(default_factory=FitnessOptions)
    space_options: Any = None
    method_options: Any = None
    operator: OperatorConfig | None = None
    training: TrainingOptions | None = None
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self) -> None:
        if self.space not in SPACE_KINDS:
            raise UserError(f"unknown search space {self.space!r} (choose from {', '.join(SPACE_KINDS)})")
        method = self.method or default_method(self.space)
        object.__setattr__(self, "method", method)
        sections = section_classes(self.space, method)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"--seed must be an integer >= 0, got {self.seed!r}")
        for name, cls in sections.items():
            value = getattr(self, name)
            if value is None:
                value = BudgetOptions() if name == "budget" else cls()  # BudgetOptions() explains what is missing
            if not isinstance(value, cls):
                raise UserError(f"section {name} of --method {method} must be a {cls.__name__}, got "
                                f"{type(value).__name__}")
            object.__setattr__(self, name, value)
        for name in ("operator", "training"):
            if name not in sections and getattr(self, name) is not None:
                raise UserError(f"--method {method} (--space {self.space}) has no {name} options")
        check_stages(self)
        PROBLEMS[self.space].check_config(self)
        if "operator" in self.requirements and (self.operator.url is None or self.operator.model is None):
            raise UserError(f"--method {method} needs --operator-url and --operator-model (an OpenAI-compatible "
                            f"chat endpoint; the API key is read from ${self.operator.api_key_env})")
        if self.execution.gpus_per_worker is not None and not str(self.model.device).startswith("cuda"):
            raise UserError("--gpus-per-worker needs --device cuda (CPU workers split the CPUs)")

    # -- derived ------------------------------------------------------------------------
    @property
    def strategy_cls(self) -> type:
        return get_strategy(self.method, self.space)

    @property
    def requirements(self) -> frozenset[str]:
        """What the strategy needs for these options (see :attr:`evoprune.search.base.Strategy.needs`)."""
        return self.strategy_cls.requirements(self.method_options)

    @property
    def selection(self):
        """The method's :class:`~evoprune.search.base.Selection` (stages, survivors, racing)."""
        return self.strategy_cls.selection(self.method_options)

    @property
    def distributed(self) -> bool:
        return self.execution.distributed

    @property
    def load_device_map(self) -> str | None:
        return self.execution.load_device_map(self.model.device)

    def strategy_options(self, inputs: dict | None = None) -> dict:
        """Keyword options of the strategy: its resolved options plus the runner-supplied ``inputs``."""
        opts = {f.name: getattr(self.method_options, f.name) for f in dataclasses.fields(self.method_options)}
        return {**opts, **(inputs or {})}

    # -- records ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The record (``config.json`` minus the format marker): top-level keys and every section's fields."""
        inputs = self.strategy_cls.inputs
        out: dict[str, Any] = {"space": self.space, "method": self.method, "seed": self.seed}
        for name in section_classes(self.space, self.method):
            d = dataclasses.asdict(getattr(self, name))
            if name == "method_options":
                d = {k: v for k, v in d.items() if k not in inputs}
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return out

    def replace_execution(self, **changes) -> "SearchConfig":
        """The same search with other execution options (e.g. another worker count on resume)."""
        return dataclasses.replace(self, execution=dataclasses.replace(self.execution, **changes))

    # -- ways in ------------------------------------------------------------------------
    @classmethod
    def build(cls, **flags) -> "SearchConfig":
        """A config from flat option names (``method="evo", drop_count=6, generations=10``), as the CLI and
        Python callers give them: each name goes to the section that has it for this space and method; a
        name that belongs to another method or space, or to none, is a :class:`UserError`. ``None`` values
        mean "not given"."""
        return cls.from_dict({k: v for k, v in flags.items() if v is not None})

    @classmethod
    def _from_values(cls, space: str, method: str, seed, values: dict[str, dict]) -> "SearchConfig":
        sections = section_classes(space, method)
        built = {}
        for name, section_cls in sections.items():
            given = values.get(name) or {}
            if name == "budget" and not given:
                continue  # SearchConfig says what is missing
            built[name] = _construct(section_cls, given, f"{name} options of --method {method}")
        return cls(space=space, method=method, seed=seed, **built)

    @classmethod
    def from_dict(cls, d: dict, overrides: dict | None = None) -> "SearchConfig":
        """A config from a record or recipe: sections by name (field names inside), top-level ``space``,
        ``method``, ``seed``, and any flat option names at the top level; ``overrides`` (flat names, e.g.
        the command line's) win. A flat legacy record (``"evoprune_run": 1``) is read leniently. In a run
        record (``"evoprune_run"`` present) an option it lacks takes its ``legacy`` value (see
        :func:`~evoprune.options.opt`), so an old run resumes as it ran."""
        if not isinstance(d, dict):
            raise UserError("a search configuration must be a mapping")
        legacy = d.get("evoprune_run") == 1
        record = "evoprune_run" in d  # a run's config.json: options it does not hold predate it
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        d = {k: v for k, v in d.items() if k != "evoprune_run"}
        top = {k: d[k] for k in _TOP if k in d} | {k: overrides[k] for k in _TOP if k in overrides}
        for k in ("space", "method"):
            if k in top and not str(top[k]).strip():
                raise UserError(f"--{k} must not be empty")
        space = top.get("space", "layers")
        if space not in SPACE_KINDS:
            raise UserError(f"unknown search space {space!r} (choose from {', '.join(SPACE_KINDS)})")
        method = top.get("method") or default_method(space)
        sections = section_classes(space, method)
        inputs = get_strategy(method, space).inputs
        values: dict[str, dict] = {name: {} for name in sections}
        flat = {k: v for k, v in d.items() if k not in _TOP and not (k in sections and isinstance(v, dict))}
        for name in sections:  # sections by name, field names inside
            given = d.get(name)
            if not isinstance(given, dict):
                continue
            by_field = {o.field: o for o in options_of(sections[name])}
            for key, value in given.items():
                if key not in by_field:
                    raise UserError(f"unknown option {key!r} in section {name} of --method {method}")
                if not (name == "method_options" and key in inputs):
                    values[name][key] = cls._parsed(by_field[key], value, key)
        unknown = [k for k, v in d.items() if isinstance(v, dict) and k not in sections and k not in _TOP]
        if unknown:
            raise UserError(f"--method {method} (--space {space}) has no {unknown[0]} options")
        table = flag_table(sections, method_inputs=inputs)
        for key, value in {**flat, **{k: v for k, v in overrides.items() if k not in _TOP}}.items():
            if value is None:
                continue
            if key not in table:
                if legacy:  # a flat record of an earlier version holds every option of every method
                    continue
                raise UserError(_not_an_option(key, space, method))
            section, o = table[key]
            values[section][o.field] = cls._parsed(o, value, key)
        if record:
            for name, sec in sections.items():
                for f in dataclasses.fields(sec):
                    if "legacy" in f.metadata and f.name not in values[name]:
                        values[name][f.name] = f.metadata["legacy"]
        for key, value in get_strategy(method, space).calibration.items():
            values["calibration"].setdefault(key, value)
        return cls._from_values(space, method, top.get("seed", 0), values)

    @staticmethod
    def _parsed(o, value, key: str):
        try:
            return parse_value(o, value)
        except ValueError as e:
            raise UserError(f"--{key.replace('_', '-')}: {e}") from None


def _not_an_option(key: str, space: str, method: str) -> str:
    """Why ``--key`` does not apply: which methods/spaces have it, or that none does."""
    from ..search import methods

    flag = f"--{key.replace('_', '-')}"
    owners = []
    for sp in SPACE_KINDS:
        for m in methods(sp):
            if key in flag_table(section_classes(sp, m), method_inputs=get_strategy(m, sp).inputs):
                owners.append(m if sp == space else f"{m} (--space {sp})")
    if not owners:
        return f"unknown option {flag}"
    return f"{flag} is not an option of --method {method} (--space {space}); it is one of: {', '.join(owners)}"
