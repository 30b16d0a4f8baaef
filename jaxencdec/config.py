"""Model configurations: ``EncoderDecoderConfig``, a pair of architecture configs (``jaxencdec.architectures``,
whose names this module exports too) and the shared token ids, round-tripping Hugging Face ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from jaxencdec.architectures import (ARCHITECTURES, RUNTIME_FLAGS, AlbertConfig, BertConfig,
                                     BertGenerationConfig, CamembertConfig, DistilBertConfig, ElectraConfig,
                                     GPT2Config, HFConfig, ModernBertConfig, Role, RobertaConfig, XLMRobertaConfig,
                                     checked_replace, naming_errors)
from jaxencdec.bart_architectures import BartConfig, MarianConfig, MBartConfig
from jaxencdec.errors import ConfigError, require
from jaxencdec.fields import assigned_through_replace, check_types, frozen, to_json
from jaxencdec.llm_architectures import Gemma3TextConfig, LlamaConfig, Qwen2Config
from jaxencdec.spec import TransformerSpec
from jaxencdec.storage import read_json

__all__ = ["ARCHITECTURES", "REMAT_POLICIES", "RUNTIME_FLAGS", "AlbertConfig", "BartConfig", "BertConfig",
           "BertGenerationConfig", "CamembertConfig", "DistilBertConfig", "ElectraConfig", "EncoderDecoderConfig",
           "Gemma3TextConfig", "GPT2Config", "HFConfig", "LlamaConfig", "MarianConfig", "MBartConfig",
           "ModernBertConfig", "Qwen2Config",
           "Role", "RobertaConfig", "XLMRobertaConfig"]

# ``EncoderDecoderConfig.remat``: what each layer keeps for the backward pass. "none" keeps every intermediate;
# "full" keeps only the layer's input and recomputes the rest; the others are ``jax.checkpoint_policies`` that keep
# matmul outputs (all of them, or those without batch dimensions: not the attention scores and probabilities).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")



@assigned_through_replace("model.config")
@dataclass(frozen=True)
class EncoderDecoderConfig:
    """Hugging Face ``EncoderDecoderConfig``: an encoder config, a decoder config and the shared token ids.

    Two fields say how the layers run, not what they compute, and are not written to ``config.json`` (the
    weights saved are the same either way):

    - ``remat``: one of ``REMAT_POLICIES``, the activation rematerialization of every layer in training
      (``"full"`` is transformers' ``gradient_checkpointing``).
    - ``scan_layers``: each stack's layers run as one ``nn.scan`` over parameters stacked on a leading ``layers``
      axis (``layers/...`` instead of ``layers_0/...``, ``layers_1/...``): one layer is compiled instead of
      ``num_layers``. ``models.layout`` converts trees between the two layouts.
    """

    model_type: ClassVar[str] = "encoder-decoder"
    encoder: HFConfig
    decoder: HFConfig
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_encoder_decoder: bool = False
    # How the layers run, not what they compute (not written to config.json): see the docstring.
    remat: str = "none"
    scan_layers: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        check_types(self, ConfigError)
        require(self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        object.__setattr__(self, "eos_token_id", frozen(self.eos_token_id))
        require(self.decoder.is_decoder and self.decoder.add_cross_attention or isinstance(self.decoder, BartConfig),
                "the decoder config must have is_decoder=True and add_cross_attention=True "
                "(EncoderDecoderConfig.from_encoder_decoder_configs sets both)")
        cross = self.decoder.cross_attention_hidden_size
        require(cross is None or cross == self.encoder.hidden,
                f"decoder cross_attention_hidden_size {cross} must equal the encoder's hidden size "
                f"{self.encoder.hidden}")
        encoder = self.encoder.spec("encoder")
        self.decoder.spec("decoder")
        require(not (self.scan_layers and encoder.num_layers <= encoder.unscanned_layers),
                "scan_layers=True runs the encoder's first layer unrolled (it has no attention norm) and scans the "
                "rest, so it needs 2 layers or more; this one has 1: set scan_layers=False")
        if self.tie_encoder_decoder:
            self._check_tieable()

    def _check_tieable(self) -> None:
        """``tie_encoder_decoder``: transformers ties each decoder module to the encoder module of the same name
        (embeddings, self-attention, MLP, norms). BERT, RoBERTa-family and BertGeneration stacks share those
        names; the shared tensors must have one shape, and every decoder layer needs an encoder layer of the same
        index."""
        kinds = (self.encoder.model_type, self.decoder.model_type)
        require(all(isinstance(part, (BertConfig, BertGenerationConfig)) for part in (self.encoder, self.decoder)),
                f"tie_encoder_decoder=True needs a BERT, RoBERTa-family or BertGeneration encoder and decoder "
                f"(transformers ties "
                f"modules by name, and only those share their names); got encoder {kinds[0]!r} and decoder "
                f"{kinds[1]!r}")
        encoder, decoder = self.encoder_spec, self.decoder_spec
        sizes = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "max_positions", "type_vocab_size",
                 "relative_attention")
        differ = [f"{name} {getattr(encoder, name)} vs {getattr(decoder, name)}" for name in sizes
                  if getattr(encoder, name) != getattr(decoder, name)]
        require(not differ, "tie_encoder_decoder=True shares the encoder's embeddings and layers with the decoder, "
                            "so their sizes and position schemes must agree; encoder vs decoder: "
                            f"{', '.join(differ)}")
        require(decoder.num_layers <= encoder.num_layers,
                f"tie_encoder_decoder=True ties decoder layer i to encoder layer i, but the decoder has "
                f"{decoder.num_layers} layers and the encoder only {encoder.num_layers}")

    @classmethod
    def from_encoder_decoder_configs(cls, encoder: HFConfig, decoder: HFConfig, **kwargs) -> "EncoderDecoderConfig":
        """Combines two standalone configs; the decoder gets ``is_decoder`` and ``add_cross_attention`` set."""
        encoder = encoder.replace(is_decoder=False, add_cross_attention=False)
        decoder = decoder.replace(is_decoder=True, add_cross_attention=True)
        flags = {k: kwargs.pop(k) for k in list(kwargs) if k in RUNTIME_FLAGS}
        config = cls(encoder=encoder, decoder=decoder, **kwargs)
        return config.replace(**flags) if flags else config

    @property
    def encoder_spec(self) -> TransformerSpec:
        return self.encoder.spec("encoder")

    @property
    def decoder_spec(self) -> TransformerSpec:
        return self.decoder.spec("decoder")

    @property
    def is_encoder_decoder(self) -> bool:
        """Always True (transformers' ``EncoderDecoderConfig.is_encoder_decoder``)."""
        return True

    @property
    def needs_projection(self) -> bool:
        """Whether encoder states pass through ``enc_to_dec_proj`` (hidden sizes differ, as in transformers)."""
        return self.encoder.hidden != self.decoder.hidden and self.decoder.cross_attention_hidden_size is None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EncoderDecoderConfig":
        if data.get("model_type") != cls.model_type:
            raise ConfigError(f"expected model_type 'encoder-decoder', got {data.get('model_type')!r}")
        for part in ("encoder", "decoder"):
            if not isinstance(data.get(part), Mapping):
                raise ConfigError(f"an encoder_decoder config needs an {part!r} object")
        names = {"decoder_start_token_id", "pad_token_id", "eos_token_id", "tie_encoder_decoder"}
        parts = {}
        for part in ("encoder", "decoder"):
            with naming_errors(part):
                parts[part] = HFConfig.from_dict(data[part])
        return cls(
            **parts, **{k: v for k, v in data.items() if k in names},
            extra={k: v for k, v in data.items() if k not in names | {"encoder", "decoder", "model_type"}},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra, "encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict(),
            "decoder_start_token_id": self.decoder_start_token_id, "pad_token_id": self.pad_token_id,
            "eos_token_id": to_json(self.eos_token_id), "tie_encoder_decoder": self.tie_encoder_decoder,
            "is_encoder_decoder": True, "model_type": self.model_type,
        }

    @classmethod
    def from_json_file(cls, path) -> "EncoderDecoderConfig":
        """Reads an encoder-decoder ``config.json``; a bad value is a ConfigError naming the file and the field."""
        with naming_errors(path):
            return cls.from_dict(read_json(path))

    def replace(self, **changes) -> "EncoderDecoderConfig":
        """A copy with ``changes``; an unknown field name is a ConfigError listing the close matches. A part's
        field is changed through the part: ``config.replace(decoder=config.decoder.replace(vocab_size=...))``."""
        return checked_replace(self, changes, "the encoder's and decoder's own fields are set through the part: "
                                       "config.replace(decoder=config.decoder.replace(field=value))")
