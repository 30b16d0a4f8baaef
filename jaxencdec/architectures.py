"""Architecture configs: frozen dataclasses that round-trip the ``config.json`` of one Hugging Face stack.

Each config mirrors the Hugging Face class of the same name field for field (same names, same defaults), keeps
every key it does not model in ``extra`` so that writing it back loses nothing, and reduces itself to a
:class:`jaxencdec.spec.TransformerSpec`: the architecture-agnostic description that the shared ``nn`` blocks are
built from. Architectures differ only in the spec they produce, never in module code. ``jaxencdec.config`` pairs
two of them into an ``EncoderDecoderConfig`` (and exports every name defined here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal, Mapping

from jaxencdec.errors import ConfigError, require
from jaxencdec.fields import (assigned_through_replace, check_types, frozen, replace as replace_fields, to_json,
                              unknown_names)
from jaxencdec.spec import TransformerSpec
from jaxencdec.storage import read_json

Role = Literal["encoder", "decoder"]


# transformers ``PretrainedConfig`` settings that choose what a forward pass returns or how it runs, never the
# numbers it computes: a programmatic override of one is kept in ``extra`` (written back to config.json, as
# transformers writes it) instead of refused.
RUNTIME_FLAGS = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
                           "use_return_dict", "output_scores", "chunk_size_feed_forward"})


def checked_replace(config, changes: Mapping[str, Any], hint: str = ""):
    """``config.replace``: ``changes`` applied, the ``RUNTIME_FLAGS`` that are no field kept in ``extra``; an unknown
    name is a ConfigError listing its closest field names (and ``hint``), since an override with a typo must not be
    kept as an unknown key."""
    names = [f.name for f in dataclasses.fields(config) if f.name != "extra"]
    unknown = unknown_names(changes, [*names, *RUNTIME_FLAGS])
    if unknown:
        raise ConfigError(f"{type(config).__name__} has no field(s) {', '.join(unknown)}; its fields: "
                          f"{', '.join(names)}" + (f"; {hint}" if hint else ""))
    return replace_fields(config, changes, RUNTIME_FLAGS)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class HFConfig:
    """Fields every Hugging Face ``PretrainedConfig`` has, and the ``config.json`` round trip."""

    model_type: ClassVar[str] = ""

    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    cross_attention_hidden_size: int | None = None
    # Keys of config.json this class does not model, kept verbatim for the way back.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        check_types(self, ConfigError)
        object.__setattr__(self, "eos_token_id", frozen(self.eos_token_id))  # hashable: a static jit argument

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HFConfig":
        """Builds the config class named by ``data["model_type"]`` (or ``cls`` if it is concrete)."""
        target = cls
        if not cls.model_type:
            model_type = data.get("model_type")
            if model_type not in ARCHITECTURES:
                raise ConfigError(f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
            target = ARCHITECTURES[model_type]
        elif data.get("model_type", cls.model_type) != cls.model_type:
            raise ConfigError(f"expected model_type {cls.model_type!r}, got {data['model_type']!r}")
        names = {f.name for f in dataclasses.fields(target)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        return target(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: to_json(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **values, "model_type": self.model_type}

    @classmethod
    def from_json_file(cls, path) -> "HFConfig":
        """Reads a Hugging Face ``config.json``; a bad value is a ConfigError naming the file and the field."""
        with naming_errors(path):
            return cls.from_dict(read_json(path))

    def replace(self, **changes) -> "HFConfig":
        """A copy with ``changes``; an unknown field name is a ConfigError listing the close matches
        (transformers' ``RUNTIME_FLAGS``, e.g. ``use_cache``, are kept in ``extra``)."""
        return checked_replace(self, changes)

    def spec(self, role: Role) -> TransformerSpec:
        raise NotImplementedError

    @property
    def hidden(self) -> int:
        """Model width, whatever the architecture calls it."""
        raise NotImplementedError


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class BertConfig(HFConfig):
    """Hugging Face ``BertConfig``."""

    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"

    # position_embedding_type -> TransformerSpec.relative_attention (transformers 4's values; 5 has only "absolute")
    POSITION_EMBEDDING_TYPES: ClassVar[Mapping[str, str | None]] = types.MappingProxyType(
        {"absolute": None, "relative_key": "key", "relative_key_query": "key_query"})

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        require(self.position_embedding_type in self.POSITION_EMBEDDING_TYPES,
                f"position_embedding_type {self.position_embedding_type!r} is not supported; use one of "
                f"{', '.join(map(repr, self.POSITION_EMBEDDING_TYPES))}")
        relative = self.POSITION_EMBEDDING_TYPES[self.position_embedding_type]
        return _bert_layers_spec(
            self, role,
            # relative attention: RoBERTa's padding-based positions are computed by transformers but never used
            positions_from_padding=isinstance(self, RobertaConfig) and not relative,
            type_vocab_size=self.type_vocab_size, pooler=role == "encoder", lm_head_transform=True,
            lm_head_bias=True, relative_attention=relative,
        )


def _bert_layers_spec(config: HFConfig, role: Role, **specifics) -> TransformerSpec:
    """The spec of a config with BERT's field names (BERT, the RoBERTa family, BertGeneration, ELECTRA), whose
    stacks run BERT's post-norm layers; ``specifics``: the spec fields its architecture sets besides."""
    decoder = role == "decoder"
    return TransformerSpec(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        activation=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
        max_positions=config.max_position_embeddings, pad_token_id=config.pad_token_id,
        is_decoder=decoder, add_cross_attention=decoder and config.add_cross_attention,
        tie_word_embeddings=config.tie_word_embeddings, hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob, embedding_dropout=config.hidden_dropout_prob,
        initializer_range=config.initializer_range, **specifics,
    )


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """Hugging Face ``RobertaConfig``: BERT with positions counted from ``pad_token_id + 1``."""

    model_type: ClassVar[str] = "roberta"
    vocab_size: int = 50265
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class XLMRobertaConfig(RobertaConfig):
    """Hugging Face ``XLMRobertaConfig``: RoBERTa's architecture under its own ``model_type`` (multilingual
    checkpoints such as xlm-roberta-base, with a 250,002-token vocabulary)."""

    model_type: ClassVar[str] = "xlm-roberta"
    vocab_size: int = 30522


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class CamembertConfig(RobertaConfig):
    """Hugging Face ``CamembertConfig``: RoBERTa's architecture under its own ``model_type`` (French)."""

    model_type: ClassVar[str] = "camembert"
    vocab_size: int = 30522


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class BertGenerationConfig(HFConfig):
    """Hugging Face ``BertGenerationConfig``: BERT's layers without token types, pooler or LM-head transform (the
    BertGenerationEncoder / BertGenerationDecoder of the BERT-to-BERT summarizers warm-started from BERT)."""

    model_type: ClassVar[str] = "bert-generation"
    vocab_size: int = 50358
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        return _bert_layers_spec(self, role, lm_head_bias=True)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class ElectraConfig(HFConfig):
    """Hugging Face ``ElectraConfig``: BERT's layers under embeddings of their own width ``embedding_size``
    (projected to ``hidden_size`` when they differ) and, as a decoder, ElectraForCausalLM's generator head (dense
    to ``embedding_size``, gelu, norm, the tied word table). No pooler. The sequence-summary settings of its
    classification heads stay in ``extra``."""

    model_type: ClassVar[str] = "electra"
    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        return _bert_layers_spec(self, role, type_vocab_size=self.type_vocab_size, embedding_size=self.embedding_size,
                                 lm_head_transform=True, lm_head_activation="gelu", lm_head_bias=True)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class DistilBertConfig(HFConfig):
    """Hugging Face ``DistilBertConfig``: BERT's post-norm layers without token types or pooler; an encoder only
    (transformers has no DistilBERT causal LM to decode with)."""

    model_type: ClassVar[str] = "distilbert"
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int | None = 0

    @property
    def hidden(self) -> int:
        return self.dim

    def spec(self, role: Role) -> TransformerSpec:
        require(role == "encoder", "DistilBERT is supported as an encoder only (transformers has no DistilBERT "
                                   "causal LM); pair it with another architecture's decoder")
        require(not self.sinusoidal_pos_embds, "DistilBERT with sinusoidal_pos_embds=True (fixed, untrained "
                                               "positions) is not supported")
        return TransformerSpec(
            vocab_size=self.vocab_size, hidden_size=self.dim, num_layers=self.n_layers, num_heads=self.n_heads,
            intermediate_size=self.hidden_dim, activation=self.activation, layer_norm_eps=1e-12,
            max_positions=self.max_position_embeddings, pad_token_id=self.pad_token_id,
            hidden_dropout=self.dropout, attention_dropout=self.attention_dropout, embedding_dropout=self.dropout,
            initializer_range=self.initializer_range,
        )


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class AlbertConfig(HFConfig):
    """Hugging Face ``AlbertConfig``: BERT's post-norm layers under embeddings of width ``embedding_size``
    (projected to ``hidden_size``), consecutive layers sharing their parameters in ``num_hidden_groups`` groups,
    and a pooler; an encoder only (transformers has no ALBERT causal LM to decode with)."""

    model_type: ClassVar[str] = "albert"
    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 4096
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    num_attention_heads: int = 64
    intermediate_size: int = 16384
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        require(role == "encoder", "ALBERT is supported as an encoder only (transformers has no ALBERT causal LM); "
                                   "pair it with another architecture's decoder")
        require(self.inner_group_num == 1, f"ALBERT with inner_group_num={self.inner_group_num} (several layers "
                                           f"per group) is not supported; the released checkpoints have 1")
        position_type = self.extra.get("position_embedding_type", "absolute")
        require(position_type == "absolute", f"ALBERT with position_embedding_type {position_type!r} is not "
                                             f"supported; use 'absolute'")
        return _bert_layers_spec(self, role, type_vocab_size=self.type_vocab_size, embedding_size=self.embedding_size,
                                 layer_groups=self.num_hidden_groups, pooler=True)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class GPT2Config(HFConfig):
    """Hugging Face ``GPT2Config``."""

    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    @property
    def hidden(self) -> int:
        return self.n_embd

    def spec(self, role: Role) -> TransformerSpec:
        require(self.scale_attn_weights and not self.scale_attn_by_inverse_layer_idx,
                "GPT-2 attention scaling variants (scale_attn_weights=False, scale_attn_by_inverse_layer_idx) "
                "are not supported")
        require(role == "decoder", "GPT-2 is supported as a decoder only")
        return TransformerSpec(
            vocab_size=self.vocab_size, hidden_size=self.n_embd, num_layers=self.n_layer, num_heads=self.n_head,
            intermediate_size=self.n_inner or 4 * self.n_embd, activation=self.activation_function,
            layer_norm_eps=self.layer_norm_epsilon, max_positions=self.n_positions, pad_token_id=self.pad_token_id,
            embedding_norm=False, pre_norm=True, is_decoder=True, add_cross_attention=self.add_cross_attention,
            tie_word_embeddings=self.tie_word_embeddings, hidden_dropout=self.resid_pdrop,
            attention_dropout=self.attn_pdrop, embedding_dropout=self.embd_pdrop,
            initializer_range=self.initializer_range,
        )


def rope_base(config: HFConfig, parameters: Mapping[str, Any], default: float, name: str = "rope_theta") -> float:
    """The rotary base in ``parameters`` (a transformers 5 ``rope_parameters`` entry) or, written by transformers 4,
    the config's ``name`` (``rope_scaling`` giving the type); scaled variants (linear, dynamic, YaRN, Llama 3's)
    are refused."""
    scaling = config.extra.get("rope_scaling") or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    require(kind == "default", f"{config.model_type} with rope type {kind!r} is not supported; only the default "
                               f"(unscaled) rotary positions are: set rope_parameters.rope_type to 'default'")
    return float(parameters.get("rope_theta", config.extra.get(name, default)))


def layer_kinds(config: HFConfig) -> tuple[str, ...]:
    """``TransformerSpec.layer_kinds`` from a config's transformers ``layer_types`` ("full_attention" or
    "sliding_attention" per layer); another type is refused."""
    unknown = sorted(set(config.layer_types) - {"sliding_attention", "full_attention"})
    require(not unknown, f"{config.model_type} layer_types {unknown} are not supported; use 'sliding_attention' "
                         f"or 'full_attention'")
    return tuple("sliding" if kind == "sliding_attention" else "full" for kind in config.layer_types)


@assigned_through_replace("encoder_config")
@dataclass(frozen=True)
class ModernBertConfig(HFConfig):
    """Hugging Face ``ModernBertConfig``: an encoder only. Pre-norm layers under normalized embeddings (the first
    layer does not normalize again), layer norms without biases (``norm_bias``), rotary positions, a GeGLU MLP
    (``Wi`` holds the activated half first) and, between the global layers (every ``global_attn_every_n_layers``-th),
    layers that see the ``local_attention // 2`` nearest tokens either side, with their own rotary base. Its
    first layer differs from the others: with ``scan_layers`` it runs unrolled, the rest scanned."""

    model_type: ClassVar[str] = "modernbert"
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    layer_types: list[str] | None = None
    pad_token_id: int | None = 50283
    bos_token_id: int | None = 50281
    eos_token_id: int | list[int] | None = 50282

    def __post_init__(self):
        super().__post_init__()
        kinds = self.layer_types or [  # as transformers derives them: every n-th layer global, from the first
            "sliding_attention" if i % self.global_attn_every_n_layers else "full_attention"
            for i in range(self.num_hidden_layers)]
        object.__setattr__(self, "layer_types", frozen(kinds))

    @property
    def hidden(self) -> int:
        return self.hidden_size

    def spec(self, role: Role) -> TransformerSpec:
        require(role == "encoder", "ModernBERT is supported as an encoder only (transformers has no ModernBERT "
                                   "causal LM); pair it with another architecture's decoder")
        rope = self.extra.get("rope_parameters") or {}
        return TransformerSpec(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            activation=self.hidden_activation, layer_norm_eps=self.norm_eps, max_positions=0,
            context_length=self.max_position_embeddings, pad_token_id=self.pad_token_id, norm_bias=self.norm_bias,
            first_layer_attention_norm=False, pre_norm=True, rotary_theta=rope_base(
                self, rope.get("full_attention") or {}, 160000.0, "global_rope_theta"),
            local_rotary_theta=rope_base(self, rope.get("sliding_attention") or {}, 10000.0, "local_rope_theta"),
            layer_kinds=layer_kinds(self), sliding_window=self.local_attention // 2 + 1, gated_mlp=True,
            attention_bias=self.attention_bias, attention_out_bias=self.attention_bias, mlp_bias=self.mlp_bias,
            hidden_dropout=self.attention_dropout,
            attention_dropout=self.attention_dropout, activation_dropout=self.mlp_dropout,
            embedding_dropout=self.embedding_dropout, initializer_range=self.initializer_range,
        )


# model_type -> config class: the classes here, and those ``register`` adds (``jaxencdec.bart_architectures``,
# ``jaxencdec.llm_architectures``).
ARCHITECTURES: dict[str, type[HFConfig]] = {}


def register(*classes: type[HFConfig]) -> None:
    """Makes ``HFConfig.from_dict`` build ``classes`` from a ``config.json`` of their ``model_type``."""
    ARCHITECTURES.update({c.model_type: c for c in classes})


register(BertConfig, RobertaConfig, XLMRobertaConfig, CamembertConfig, BertGenerationConfig, ElectraConfig,
         DistilBertConfig, AlbertConfig, ModernBertConfig, GPT2Config)


@contextlib.contextmanager
def naming_errors(where) -> Iterator[None]:
    """Prefixes the message of a ConfigError raised inside with ``where`` (a file, or a part of a config)."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
