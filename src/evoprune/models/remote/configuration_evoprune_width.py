"""Config classes of evoprune width-pruned models (standalone: imports only transformers).

One subclass per supported base family. Each keeps the base ``model_type`` and
every base field; the pruned widths live in one extra field, ``evoprune_width``
(see ``modeling_evoprune_width`` for its layout). The subclasses exist so that
loading an export registers remote code under *this* config class, never under
the stock one.
"""
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

__all__ = ["CONFIG_CLASSES"]


class EvopruneWidthLlamaConfig(LlamaConfig):
    """LlamaConfig + ``evoprune_width`` (per-layer attention groups and MLP channels)."""


class EvopruneWidthMistralConfig(MistralConfig):
    """MistralConfig + ``evoprune_width``."""


class EvopruneWidthQwen2Config(Qwen2Config):
    """Qwen2Config + ``evoprune_width``."""


class EvopruneWidthQwen3Config(Qwen3Config):
    """Qwen3Config + ``evoprune_width``."""


class EvopruneWidthGemma3TextConfig(Gemma3TextConfig):
    """Gemma3TextConfig + ``evoprune_width``."""


class EvopruneWidthOPTConfig(OPTConfig):
    """OPTConfig + ``evoprune_width``."""


# base model_type -> config class of its width-pruned export
CONFIG_CLASSES = {
    "llama": EvopruneWidthLlamaConfig,
    "mistral": EvopruneWidthMistralConfig,
    "qwen2": EvopruneWidthQwen2Config,
    "qwen3": EvopruneWidthQwen3Config,
    "gemma3_text": EvopruneWidthGemma3TextConfig,
    "opt": EvopruneWidthOPTConfig,
}
