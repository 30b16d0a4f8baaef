"""jaxencdec: Hugging Face-style encoder-decoder models in JAX/Flax.

The public names below are imported on first use (PEP 562), so that importing one light module of the package
(``jaxencdec.generation.serving``, to serve an exported generate function) does not import the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxencdec.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "CheckpointError": "jaxencdec.errors", "ConfigError": "jaxencdec.errors",
    "BartConfig": "jaxencdec.config", "BertConfig": "jaxencdec.config", "EncoderDecoderConfig": "jaxencdec.config",
    "GPT2Config": "jaxencdec.config", "RobertaConfig": "jaxencdec.config", "XLMRobertaConfig": "jaxencdec.config",
    "CamembertConfig": "jaxencdec.config", "DistilBertConfig": "jaxencdec.config", "AlbertConfig": "jaxencdec.config",
    "BertGenerationConfig": "jaxencdec.config", "ElectraConfig": "jaxencdec.config", "MBartConfig": "jaxencdec.config",
    "LlamaConfig": "jaxencdec.config", "Qwen2Config": "jaxencdec.config", "Gemma3TextConfig": "jaxencdec.config",
    "MarianConfig": "jaxencdec.config", "ModernBertConfig": "jaxencdec.config",
    "TransformerSpec": "jaxencdec.spec",
    "GenerateOutput": "jaxencdec.generation.api", "make_generate_fn": "jaxencdec.generation.api",
    "GenerationConfig": "jaxencdec.generation.config", "GenerationConfigError": "jaxencdec.generation.config",
    "EncoderDecoderModel": "jaxencdec.modeling",
    "Tokenizer": "jaxencdec.tokenizer",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # static analysers and IDEs see the names as plain imports
    from jaxencdec.config import (AlbertConfig, BartConfig, BertConfig, BertGenerationConfig, CamembertConfig,
                                  DistilBertConfig, ElectraConfig, EncoderDecoderConfig, Gemma3TextConfig,
                                  GPT2Config, LlamaConfig, MarianConfig, MBartConfig, ModernBertConfig, Qwen2Config,
                                  RobertaConfig, XLMRobertaConfig)
    from jaxencdec.errors import CheckpointError, ConfigError
    from jaxencdec.generation.api import GenerateOutput, make_generate_fn
    from jaxencdec.generation.config import GenerationConfig, GenerationConfigError
    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.spec import TransformerSpec
    from jaxencdec.tokenizer import Tokenizer


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jaxencdec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
