"""``TransformerSpec``: what the shared building blocks need to know about one stack, whatever the architecture.

Every architecture config of :mod:`jaxencdec.config` reduces itself to one spec per stack; the transformer stack of
``models.transformer`` is built from a spec, and ``checkpoint.names`` reads from one the sizes of the tensors it
maps.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxencdec.errors import require

# Hugging Face activation names -> the names our MLP understands.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu", "swish", "tanh")

# The ``relative_attention`` of a ``TransformerSpec``: None, or relative position scores as transformers 4's BERT
# computed them (query . distance embedding, and for "key_query" also key . distance embedding).
RELATIVE_ATTENTION = (None, "key", "key_query")

# The ``norm`` of a ``TransformerSpec``: layer norm (scale and bias), RMS norm (scale only: Llama's RMSNorm), or
# Gemma's RMS norm (``x / rms(x) * (1 + scale)``, in float32).
NORMS = ("layer", "rms", "rms_unit_offset")

# The kinds of a layer's self-attention (``TransformerSpec.layer_kinds``): over every earlier position, or over the
# last ``sliding_window`` ones.
LAYER_KINDS = ("full", "sliding")


@dataclass(frozen=True)
class TransformerSpec:
    """What the shared building blocks need to know about one stack (encoder or decoder).

    Attributes:
      vocab_size: rows of the word embedding table.
      hidden_size: model width ``D``.
      num_layers, num_heads, intermediate_size: depth, heads (``D % num_heads == 0``), MLP width.
      activation: a Hugging Face activation name from ``ACTIVATIONS``.
      layer_norm_eps: epsilon of every norm.
      max_positions: rows of the position table (``0``: no learned positions); with ``relative_attention``, the
        longest distance embedded is ``max_positions - 1``.
      norm: one of ``NORMS``: every norm of the stack a layer norm, or an RMS norm (Llama family).
      num_kv_heads: key/value heads of self-attention (grouped-query attention: each serves
        ``num_heads // num_kv_heads`` query heads). None: ``num_heads``. Cross-attention has ``num_heads``.
      head_size: the width of a head when it is not ``hidden_size // num_heads`` (Llama's ``head_dim``).
      rotary_theta: rotary position embeddings of that base on self-attention queries and keys (Llama's default
        RoPE), applied over the whole head; None: none. A stack with them has no position table.
      context_length: the longest sequence a stack without a position table takes (its config's
        ``max_position_embeddings``).
      gated_mlp: the MLP is ``wo(act(wi_gate(x)) * wi(x))`` (SwiGLU / GeGLU) instead of ``wo(act(wi(x)))``.
      attention_bias, attention_out_bias, mlp_bias: biases on the query/key/value projections, on the attention
        output projection, on the MLP's projections.
      cross_attention_gate: the cross-attention block's output is scaled by ``tanh(gate)``, a learned scalar per
        layer initialised to 0, so that a pretrained decoder-only LM given cross-attention blocks computes exactly
        what it computed alone until training moves the gates (Flamingo-style).
      qk_norm: each self-attention query and key head is normalized (the stack's ``norm``) before rotation.
      post_sublayer_norm: each block's output is normalized before the residual sum too (Gemma's
        ``post_attention_layernorm`` / ``post_feedforward_layernorm``), besides its input.
      query_scale: the factor on queries before the dot product when it is not ``head_dim ** -0.5`` (Gemma's
        ``query_pre_attn_scalar ** -0.5``).
      layer_kinds: per layer, one of ``LAYER_KINDS``; "sliding" layers attend to the nearest positions only (a
        decoder's query at ``q`` to keys ``q - sliding_window < k <= q``, an encoder's to ``|q - k| <
        sliding_window``) and rotate by ``local_rotary_theta``. None: every layer "full".
      norm_bias: layer norms have a bias (ModernBERT's have none).
      first_layer_attention_norm: the first layer normalizes its self-attention input (ModernBERT's does not:
        the embeddings are normalized already).
      position_offset: added to positions before the lookup (BART: 2).
      sinusoidal_positions: the position table is the fixed sinusoid (Marian's), computed, not a parameter.
      positions_from_padding: RoBERTa's scheme, positions count non-pad tokens from ``pad_token_id + 1``.
      pad_token_id: needed by the RoBERTa scheme.
      type_vocab_size: rows of the token-type table (``0``: none); we always use type 0.
      embed_scale: multiplier on word embeddings (BART's ``scale_embedding``).
      embedding_size: width ``E`` of the embedding tables and of the LM head's transform when it is not ``D``
        (ELECTRA): the embeddings are projected to ``D`` before the first layer. None: ``D``.
      layer_groups: consecutive layers share their parameters in this many groups (ALBERT's
        ``num_hidden_groups``; ``num_layers`` divisible by it): the stack holds ``layer_groups`` layers' parameters
        and layer ``i`` runs those of group ``i * layer_groups // num_layers``. None: each layer its own.
      embedding_norm: layer norm after the embedding sum (BERT, RoBERTa, BART).
      pre_norm: pre-layer-norm residual blocks with a final norm (GPT-2) instead of post-norm (BERT, BART).
      pooler: a tanh pooler over the first token (BERT/RoBERTa encoders).
      is_decoder: causal self-attention; add_cross_attention: a cross-attention block per layer.
      lm_head_transform: dense + activation + norm before the output projection (BERT, RoBERTa, ELECTRA).
      lm_head_activation: the transform's activation when it is not ``activation`` (ELECTRA's generator: gelu).
      lm_head_bias: a bias on the vocabulary logits.
      tie_word_embeddings: logits use the word embedding table instead of a separate matrix.
      relative_attention: one of ``RELATIVE_ATTENTION``: self-attention scores get relative position terms from a
        per-layer table ``[2 * max_positions - 1, head_dim]``, and the position table is kept (checkpoints hold
        it) but not added to the embeddings. Cross-attention never has them.
      hidden_dropout, attention_dropout, activation_dropout, embedding_dropout: dropout rates.
      initializer_range: standard deviation of the normal initializer.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    max_positions: int
    position_offset: int = 0
    sinusoidal_positions: bool = False
    positions_from_padding: bool = False
    pad_token_id: int | None = None
    type_vocab_size: int = 0
    embed_scale: float = 1.0
    embedding_size: int | None = None
    layer_groups: int | None = None
    embedding_norm: bool = True
    pre_norm: bool = False
    pooler: bool = False
    is_decoder: bool = False
    add_cross_attention: bool = False
    lm_head_transform: bool = False
    lm_head_activation: str | None = None
    lm_head_bias: bool = False
    tie_word_embeddings: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    embedding_dropout: float = 0.1
    initializer_range: float = 0.02
    relative_attention: str | None = None
    norm: str = "layer"
    num_kv_heads: int | None = None
    head_size: int | None = None
    rotary_theta: float | None = None
    context_length: int | None = None
    gated_mlp: bool = False
    attention_bias: bool = True
    attention_out_bias: bool = True
    mlp_bias: bool = True
    cross_attention_gate: bool = False
    qk_norm: bool = False
    post_sublayer_norm: bool = False
    query_scale: float | None = None
    layer_kinds: tuple[str, ...] | None = None
    sliding_window: int | None = None
    local_rotary_theta: float | None = None
    norm_bias: bool = True
    first_layer_attention_norm: bool = True

    def __post_init__(self):
        require(self.head_size is not None or self.hidden_size % self.num_heads == 0,
                f"hidden size {self.hidden_size} is not divisible by the number of attention heads {self.num_heads}")
        require(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        require(self.num_heads % self.kv_heads == 0,
                f"{self.num_heads} attention heads cannot share {self.kv_heads} key/value heads: the number of "
                f"heads must be a multiple of num_key_value_heads")
        require(self.rotary_theta is None or (self.max_positions == 0 and self.head_dim % 2 == 0),
                "rotary positions need an even head size and no position table")
        require(self.max_positions > 0 or self.context_length is not None,
                "a stack without a position table needs context_length")
        require(self.layer_kinds is None or (len(self.layer_kinds) == self.num_layers
                                             and set(self.layer_kinds) <= set(LAYER_KINDS)),
                f"layer_kinds must name one of {LAYER_KINDS} per layer ({self.num_layers}), got {self.layer_kinds}")
        require(not self.has_local_layers or (self.sliding_window or 0) > 0,
                "sliding layers need a positive sliding_window")
        for activation in (self.activation, self.lm_head_activation or self.activation):
            require(activation in ACTIVATIONS, f"activation {activation!r} is not supported; use one of {ACTIVATIONS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "embedding_width"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(not self.positions_from_padding or self.pad_token_id is not None,
                "RoBERTa-style positions need pad_token_id")
        require(self.layer_groups is None or (0 < self.layer_groups <= self.num_layers
                                               and self.num_layers % self.layer_groups == 0),
                f"{self.num_layers} layers cannot share parameters in {self.layer_groups} groups: the number of "
                f"layers must be a multiple of the number of groups")
        require(self.relative_attention in RELATIVE_ATTENTION,
                f"relative_attention must be one of {RELATIVE_ATTENTION}, got {self.relative_attention!r}")
        require(not self.relative_attention or (self.max_positions > 0 and not self.positions_from_padding
                                                and self.position_offset == 0),
                "relative_attention needs max_positions > 0 (the distance table's size) and plain positions")
        require(self.first_layer_attention_norm or not (self.is_decoder or self.layer_groups),
                "a first layer without an attention norm is for encoders whose layers share no parameters")

    @property
    def embedding_width(self) -> int:
        """``E``: the width of the embedding tables (``D`` unless ``embedding_size`` says otherwise)."""
        return self.embedding_size or self.hidden_size

    @property
    def num_layer_params(self) -> int:
        """How many layers' parameters the stack holds (``layers_0 ...``): ``layer_groups``, else ``num_layers``."""
        return self.layer_groups or self.num_layers

    @property
    def unscanned_layers(self) -> int:
        """How many leading layers run unrolled under ``scan_layers``, their parameters shaped unlike the rest's
        (ModernBERT's first: no attention norm); the others run as one scan."""
        return 0 if self.first_layer_attention_norm else 1

    def layer_params(self, layer: int) -> tuple[int, int]:
        """``(g, k)``: layer ``layer`` runs the parameters ``layers_{g}``, as their ``k``-th use (from 0)."""
        per_group = self.num_layers // self.num_layer_params
        return layer // per_group, layer % per_group

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def has_local_layers(self) -> bool:
        """Whether some layer attends through a sliding window."""
        return "sliding" in (self.layer_kinds or ())

    def is_local(self, layer: int) -> bool:
        return self.layer_kinds is not None and self.layer_kinds[layer] == "sliding"

    @property
    def kv_heads(self) -> int:
        """Key/value heads of self-attention (``num_kv_heads``, else ``num_heads``)."""
        return self.num_kv_heads or self.num_heads

    @property
    def max_length(self) -> int:
        """The longest sequence the position table can embed (without one: ``context_length``)."""
        if not self.max_positions:
            return self.context_length
        if self.positions_from_padding:
            return self.max_positions - self.pad_token_id - 1
        return self.max_positions - self.position_offset
