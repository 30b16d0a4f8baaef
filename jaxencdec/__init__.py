"""jaxencdec: Hugging Face-style encoder-decoder models in JAX/Flax."""

from jaxencdec.checkpoint.errors import CheckpointError
from jaxencdec.config import (BartConfig, BertConfig, ConfigError, EncoderDecoderConfig, GPT2Config, RobertaConfig,
                              TransformerSpec)
from jaxencdec.generation.api import GenerateOutput, make_generate_fn
from jaxencdec.generation.config import GenerationConfig, GenerationConfigError
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.tokenizer import Tokenizer

__all__ = [
    "BartConfig", "BertConfig", "CheckpointError", "ConfigError", "EncoderDecoderConfig", "EncoderDecoderModel",
    "GPT2Config", "GenerateOutput", "GenerationConfig", "GenerationConfigError", "RobertaConfig", "Tokenizer",
    "TransformerSpec", "make_generate_fn",
]
