"""Search spaces and their genomes: pure values (no torch), one module per space kind.

- :mod:`.layers`: :class:`DropPattern` / :class:`LayerDropSpace` (drop whole decoder blocks);
- :mod:`.rates`: :class:`RateVector` / :class:`WidthSpace` (a width-pruning rate per layer);
- :mod:`.levels`: :class:`LevelVector` / :class:`LevelSpace` (attention and MLP compression levels);
- :mod:`.sublayers`: :class:`SublayerPattern` / :class:`SublayerSpace` (drop attention and MLP sub-layers).

Every genome is a frozen dataclass with a stable string ``key`` (``from_key`` inverts it); every space
has ``kind``, ``feasible``, ``from_key`` and ``to_dict``.
"""
from .base import GenomeError, SearchError, as_int
from .layers import DropPattern, LayerDropSpace, k_from_sparsity, parse_layer_list
from .levels import LevelSpace, LevelVector
from .rates import RATE_DECIMALS, RateVector, WidthSpace, repair_rates, snap_rates
from .sublayers import SublayerPattern, SublayerSpace, unit_name

__all__ = ["GenomeError", "SearchError", "as_int", "DropPattern", "LayerDropSpace", "k_from_sparsity",
           "parse_layer_list", "LevelSpace", "LevelVector", "RATE_DECIMALS", "RateVector", "WidthSpace",
           "repair_rates", "snap_rates", "SublayerPattern", "SublayerSpace", "unit_name"]
