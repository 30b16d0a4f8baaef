"""One transformer stack, configured by a ``TransformerSpec`` into an encoder or a decoder with cross-attention and
an LM head, of any supported architecture (BERT, the RoBERTa family, BertGeneration, ELECTRA, DistilBERT, ALBERT,
GPT-2, BART, mBART, and the Llama family: Llama, Qwen2, Gemma 3).

Parameter tree of a stack (``[in, out]`` kernels; ``h`` heads of size ``d``; ``D`` hidden; ``E`` the embedding
width, ``D`` but for ELECTRA)::

    embeddings/word/embedding            [vocab, E]
    embeddings/position/embedding        [max_positions, E]      (learned positions; unused when relative)
    embeddings/token_type/embedding      [type_vocab, E]         (BERT, RoBERTa, ELECTRA)
    embeddings/norm/{scale,bias}         [E]                     (all but GPT-2)
    embeddings_project/{kernel [E, D], bias [D]}                  (ELECTRA, ALBERT: E-wide tables, E != D)
    layers_{i}/self_attention/{query,key,value}/{kernel [D, h, d], bias [h, d]}
    layers_{i}/self_attention/out/{kernel [h, d, D], bias [D]}
    layers_{i}/self_attention/distance/embedding [2 * max_positions - 1, d]   (relative attention)
    layers_{i}/self_attention_norm/{scale,bias}
    layers_{i}/cross_attention/...       as self_attention        (decoders)
    layers_{i}/cross_attention_norm/...
    layers_{i}/cross_attention_gate      []                      (Llama family: tanh(gate) scales the block)
    layers_{i}/mlp/wi/{kernel [D, I], bias [I]}, layers_{i}/mlp/wo/{kernel [I, D], bias [D]}
    layers_{i}/mlp/wi_gate/{kernel [D, I]}                        (gated MLPs: Llama family)
    layers_{i}/mlp_norm/{scale,bias}
    layers_{i}/{self_attention,cross_attention,mlp}_post_norm/scale   (Gemma: norms after each block)
    layers_{i}/self_attention/{query,key}_norm/scale [d]          (Gemma)
    final_norm/{scale,bias}                                       (pre-norm stacks: GPT-2, mBART, Llama family)
    pooler/{kernel [D, D], bias [D]}                              (BERT/RoBERTa encoders)
    lm_head/transform/{kernel,bias}, lm_head/transform_norm/...   (BERT/RoBERTa/ELECTRA decoders; to E)
    lm_head/output/kernel [D, vocab]                              (untied decoders)
    lm_head/bias [vocab]                                          (BERT/RoBERTa/BertGeneration/ELECTRA)

RMS norms (Llama family) have a scale only; projections may lack biases (``attention_bias``, ``mlp_bias``); the
Llama family's key/value projections have ``spec.kv_heads`` heads. ALBERT's layers share parameters:
``layers_{g}`` for each of ``spec.layer_groups`` groups of consecutive layers. With ``scan_layers`` the
``layers_{i}`` subtrees are one ``layers`` subtree whose leaves have a leading ``[num_layers]`` axis
(``models.layout`` converts), and the decoder cache is one ``KeyValue`` with leaves ``[num_layers, batch, heads,
length, head_dim]`` instead of a tuple of per-layer ones; the cross-attention keys/values likewise. ``remat``
wraps each layer in ``nn.remat`` (see ``config.REMAT_POLICIES``).
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxencdec.spec import TransformerSpec
from jaxencdec.models.layout import LAYER_AXIS, SCANNED_KEY
from jaxencdec.models.positions import positions_for, relative_distances, same_segment, self_attention_mask
from jaxencdec.nn.attention import ATTENTIONS, Attention, KeyValue, layer_of, write_cache
from jaxencdec.nn.layers import (ACTIVATION_FNS, HIDDEN_AXES, MLP, DirectParams, Dropout, Dtype, Embeddings, Rotary,
                                 constrain, dense, layer_norm, logits_dot_general, norm_layer, rotary_angles,
                                 zeros_init)

# The variable collection each stack sows its hidden states into (``Module.sow``): recorded only when mutable.
HIDDEN_STATES = "hidden_states"


def init_cache(spec: TransformerSpec, batch: int, max_length: int, dtype: Dtype = jnp.float32,
               slots: int = 1, scanned: bool = False) -> tuple[KeyValue, ...] | KeyValue:
    """An empty self-attention cache: per layer, keys/values ``[batch, heads, slots * max_length, head_dim]``;
    ``scanned``: one ``KeyValue`` of ``[num_layers, batch, heads, slots * max_length, head_dim]``.

    ``slots`` rows share each input's cache (beam search: one slot per beam, see ``TransformerStack.decode``).
    """
    shape = (batch, spec.kv_heads, slots * max_length, spec.head_dim)
    if scanned:
        shape = (spec.num_layers,) + shape
        return KeyValue(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return tuple(KeyValue(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(spec.num_layers))


def cache_rows_and_length(cache: Sequence[KeyValue] | KeyValue) -> tuple[int, int]:
    """``(batch, keys)`` of a cache in either layout (see ``init_cache``)."""
    key = cache.key if isinstance(cache, KeyValue) else cache[0].key
    return key.shape[-4], key.shape[-2]


def attention_block(spec: TransformerSpec, dtype: Dtype, param_dtype: Dtype, cross: bool, **module) -> Attention:
    """A layer's self-attention (``cross`` False) or cross-attention: the cross-attention has neither relative
    terms (transformers 4's neither), rotary positions, grouped key/value heads, query/key norms nor another
    query scale. ``module``: ``name`` or ``parent``."""
    s = spec
    own = {} if cross else dict(num_kv_heads=s.num_kv_heads, qk_norm=s.norm if s.qk_norm else None,
                                query_scale=s.query_scale or 0.0)
    return Attention(s.num_heads, s.head_dim, s.initializer_range, s.attention_dropout, dtype, param_dtype,
                     None if cross else s.relative_attention, s.max_positions, features=s.hidden_size,
                     qkv_bias=s.attention_bias, out_bias=s.attention_out_bias, norm_eps=s.layer_norm_eps,
                     **own, **module)


class TransformerLayer(DirectParams):
    """Self-attention, optional cross-attention (gated when the spec says), MLP; pre- or post-norm residuals as the
    spec says (pre-norm blocks may normalize their outputs too: ``post_sublayer_norm``)."""

    spec: TransformerSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_norm: bool = True  # False: no norm before self-attention (ModernBERT's first layer)

    def setup(self):
        s = self.spec
        norm = lambda: norm_layer(s.norm, s.layer_norm_eps, self.dtype, self.param_dtype, use_bias=s.norm_bias)
        post_norm = norm if s.post_sublayer_norm else lambda: None
        self.self_attention = attention_block(s, self.dtype, self.param_dtype, cross=False)
        self.self_attention_norm = norm() if self.attention_norm else None
        self.self_attention_post_norm = post_norm()
        if s.add_cross_attention:
            self.cross_attention = attention_block(s, self.dtype, self.param_dtype, cross=True)
            self.cross_attention_norm = norm()
            self.cross_attention_post_norm = post_norm()
            if s.cross_attention_gate:
                self.cross_attention_gate = self.param("cross_attention_gate", zeros_init(()), (), self.param_dtype)
        self.mlp = MLP(s.hidden_size, s.intermediate_size, s.activation, s.initializer_range,
                       s.activation_dropout, self.dtype, self.param_dtype, gated=s.gated_mlp, use_bias=s.mlp_bias)
        self.mlp_norm = norm()
        self.mlp_post_norm = post_norm()
        self.drop = Dropout(s.hidden_dropout)

    def _cross_attend(self, h, cross_kv, cross_mask, deterministic):
        out = self.cross_attention(h, cross_kv, cross_mask, deterministic)
        if self.spec.cross_attention_gate:
            out = out * jnp.tanh(self.cross_attention_gate).astype(out.dtype)
        return out

    def _residual(self, x, norm, sublayer, deterministic, post_norm=None):
        # Every norm and sublayer output is pinned to the batch split (see nn.layers.constrain): without the pins,
        # a data x fsdp x model mesh gave wrong decoder gradients on XLA:CPU (tests/test_sharding.py).
        def normed(h):
            return h if norm is None else constrain(norm(h), HIDDEN_AXES)

        def transformed(h):
            h = constrain(sublayer(h), HIDDEN_AXES)
            return h if post_norm is None else constrain(post_norm(h), HIDDEN_AXES)

        if self.spec.pre_norm:
            return x + self.drop(transformed(normed(x)), deterministic=deterministic)
        return normed(x + self.drop(transformed(x), deterministic=deterministic))

    def __call__(
        self, x: jax.Array, mask: jax.Array, cross_kv: KeyValue | None, cross_mask: jax.Array | None,
        cache: KeyValue | None, cache_index: jax.Array | int, deterministic: bool, distance: jax.Array | None = None,
        layer: jax.Array | None = None, angles: Rotary | None = None,
    ) -> tuple[jax.Array, KeyValue | None]:
        """``x [batch, length, D]`` -> same shape, and the updated self-attention cache (or None).

        ``distance``: the self-attention's query-key distances (``relative_distances``), for relative attention.
        ``layer``: int32 scalar, this layer's index in a ``cache`` stacked over every layer (scanned layers).
        ``angles``: the rotary angles of the tokens' positions (``nn.layers.rotary_angles``), or None.
        """

        def self_attend(h):
            nonlocal cache
            kv = self.self_attention.project_kv(h, angles)
            if cache is not None:
                cache = write_cache(cache, kv, cache_index, layer)
                kv = cache if layer is None else layer_of(cache, layer)
            return self.self_attention(h, kv, mask, deterministic, distance, angles)

        x = self._residual(x, self.self_attention_norm, self_attend, deterministic, self.self_attention_post_norm)
        if cross_kv is not None:
            x = self._residual(x, self.cross_attention_norm,
                               lambda h: self._cross_attend(h, cross_kv, cross_mask, deterministic), deterministic,
                               self.cross_attention_post_norm)
        x = self._residual(x, self.mlp_norm, lambda h: self.mlp(h, deterministic), deterministic, self.mlp_post_norm)
        return x, cache


class ScannedLayer(TransformerLayer):
    """One ``TransformerLayer`` as the body of ``nn.scan``. The carry is the hidden states and the cache of every
    layer (``[layers, ...]``, or None), which each layer updates in place at its own index (a cache passed as a
    scanned input would be copied out and written back whole, every layer of every decoding step); the scanned
    inputs are the layer's cross-attention keys/values, its index and whether it is a sliding-window layer, which
    then takes ``local_mask`` and ``local_angles`` instead of ``mask`` and ``angles``.

    Without precomputed cross keys/values (``per_layer[0]`` None) a decoder layer projects ``encoder_hidden``
    itself (teacher forcing: each layer reads the encoder states once per call).
    """

    def __call__(self, carry, per_layer, mask, cross_mask, cache_index, deterministic, distance, encoder_hidden,
                 angles, local_mask, local_angles):
        x, cache = carry
        cross_kv, layer, local = per_layer
        if local_mask is not None:
            mask = jnp.where(local, local_mask, mask)
            angles = jax.tree.map(lambda a, b: jnp.where(local, a, b), local_angles, angles)
        self.sow(HIDDEN_STATES, "states", x)  # the layer's input, as the unrolled stack records it
        if cross_kv is None and encoder_hidden is not None:
            cross_kv = self.cross_attention.project_kv(encoder_hidden)
        carry = TransformerLayer.__call__(self, x, mask, cross_kv, cross_mask, cache, cache_index, deterministic,
                                          distance, layer, angles)
        return carry, None


def _remat_policy(remat: str):
    """The ``jax.checkpoint`` policy of ``remat`` (``config.REMAT_POLICIES``, not "none"): None saves nothing."""
    return None if remat == "full" else getattr(jax.checkpoint_policies, remat)


def _rematerialized(layer_class: type[TransformerLayer], remat: str) -> type[TransformerLayer]:
    """``layer_class`` under ``nn.remat`` with the ``remat`` policy (``config.REMAT_POLICIES``); ``deterministic``
    stays a Python bool (flax counts ``self`` as argument 0)."""
    if remat == "none":
        return layer_class
    deterministic = 7 if layer_class is TransformerLayer else 6
    return nn.remat(layer_class, policy=_remat_policy(remat), static_argnums=(deterministic,))


class ScannedGroup(ScannedLayer):
    """A group of ``repeats`` consecutive layers that share one set of parameters (ALBERT), as the body of the
    stack's ``nn.scan`` over groups (parameters ``[layer_groups, ...]``): the group's layers run as an inner scan
    that reads the group's parameters (broadcast, not copied). ``per_layer`` holds ``[repeats]`` leaves; the
    records of a group are ``[repeats, ...]``. ``remat`` applies to each layer, as unrolled."""

    repeats: int = 1
    remat: str = "none"

    def __call__(self, carry, per_layer, *shared):
        def layer(module, carry, xs):
            return ScannedLayer.__call__(module, carry, xs, *shared)

        if self.remat != "none":
            layer = nn.remat(layer, policy=_remat_policy(self.remat))
        run = nn.scan(layer, variable_broadcast="params", variable_axes={ATTENTIONS: 0, HIDDEN_STATES: 0},
                      split_rngs={"params": False, "dropout": True}, length=self.repeats)
        return run(self, carry, per_layer)


class LMHead(DirectParams):
    """Hidden states ``[batch, length, D]`` -> vocabulary logits ``[batch, length, vocab]`` (float32). Without a
    transform the word table's width must be ``D``."""

    spec: TransformerSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, embeddings: Embeddings) -> jax.Array:
        s = self.spec
        if s.lm_head_transform:  # to the embeddings' width E
            hidden = dense(s.embedding_width, ("embed", "hidden"), s.initializer_range, self.dtype, self.param_dtype,
                           name="transform")(hidden)
            hidden = ACTIVATION_FNS[s.lm_head_activation or s.activation](hidden)
            hidden = layer_norm(s.layer_norm_eps, self.dtype, self.param_dtype, name="transform_norm")(hidden)
            hidden = constrain(hidden, HIDDEN_AXES)
        if s.tie_word_embeddings:
            logits = embeddings.attend(hidden)
        else:  # float32 logits, as attend gives
            logits = dense(s.vocab_size, ("embed", "vocab"), s.initializer_range, self.dtype, self.param_dtype,
                           use_bias=False, name="output", dot_general=logits_dot_general)(hidden)
        if s.lm_head_bias:
            logits = logits + self.param("bias", zeros_init(("vocab",)), (s.vocab_size,), self.param_dtype)
        return logits


class TransformerStack(nn.Module):
    """Embeddings, ``num_layers`` layers, final norm, and a pooler (encoders) or an LM head (decoders)."""

    spec: TransformerSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False

    def setup(self):
        s = self.spec
        self.embeddings = Embeddings(
            s.vocab_size, s.embedding_width, s.max_positions, s.type_vocab_size, s.embed_scale,
            s.layer_norm_eps if s.embedding_norm else None, s.embedding_dropout, s.initializer_range,
            self.dtype, self.param_dtype, add_positions=not s.relative_attention, sinusoidal=s.sinusoidal_positions,
            norm_bias=s.norm_bias,
        )
        if s.embedding_width != s.hidden_size:  # ELECTRA: E-wide embeddings projected to D
            self.embeddings_project = dense(s.hidden_size, ("embed", "hidden"), s.initializer_range, self.dtype,
                                            self.param_dtype)
        layer = _rematerialized(TransformerLayer, self.remat)
        self.layers = [layer(s, self.dtype, self.param_dtype, name=f"layers_{i}",
                             attention_norm=i > 0 or s.first_layer_attention_norm)
                       for i in range(s.unscanned_layers if self.scan_layers else s.num_layer_params)]
        if self.scan_layers:
            if s.layer_groups:  # one step per group of shared layers, each an inner scan over the group's layers
                body, extra = ScannedGroup, dict(repeats=s.num_layers // s.layer_groups, remat=self.remat)
            else:
                body, extra = _rematerialized(ScannedLayer, self.remat), {}
            scanned = nn.scan(
                body, variable_axes={"params": 0, ATTENTIONS: 0, HIDDEN_STATES: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 9, length=s.num_layer_params - s.unscanned_layers,
                metadata_params={nn.PARTITION_NAME: LAYER_AXIS},
            )
            self.scanned = scanned(s, self.dtype, self.param_dtype, name=SCANNED_KEY, **extra)
        if s.pre_norm:
            self.final_norm = norm_layer(s.norm, s.layer_norm_eps, self.dtype, self.param_dtype, use_bias=s.norm_bias)
        if s.pooler:
            self.pooler = dense(s.hidden_size, ("embed", "hidden"), s.initializer_range, self.dtype,
                                self.param_dtype)
        if s.is_decoder:
            self.lm_head = LMHead(s, self.dtype, self.param_dtype)

    def _stack(self, input_ids, mask, positions, cross_kv, cross_mask, cache, cache_index, deterministic,
               distance=None, encoder_hidden=None, local_mask=None):
        """Embeddings and layers. Sows, when ``HIDDEN_STATES`` is mutable, ``num_layers + 1`` states as
        transformers returns them: each layer's input (the embeddings first), then the final output.
        ``distance``: the self-attention's query-key distances, for relative attention (else None).
        ``encoder_hidden``: scanned decoders without ``cross_kv`` project it in each layer.
        ``local_mask``: the self-attention mask of sliding-window layers (``spec.layer_kinds``)."""
        s = self.spec
        x = self.embeddings(input_ids, positions, deterministic)
        if s.embedding_width != s.hidden_size:
            x = constrain(self.embeddings_project(x), HIDDEN_AXES)
        angles = local_angles = None
        if s.rotary_theta:
            angles = local_angles = rotary_angles(positions, s.rotary_theta, s.head_dim)
            if s.local_rotary_theta:
                local_angles = rotary_angles(positions, s.local_rotary_theta, s.head_dim)
        new_cache = []
        unrolled = s.unscanned_layers if self.scan_layers else s.num_layers
        for i in range(unrolled):
            layer = self.layers[s.layer_params(i)[0]]  # ALBERT: a group's layers share one
            self.sow(HIDDEN_STATES, "states", x)
            local = s.is_local(i)
            x, layer_cache = layer(
                x, local_mask if local else mask, None if cross_kv is None else cross_kv[i], cross_mask,
                None if cache is None else cache[i], cache_index, deterministic, distance, None,
                local_angles if local else angles,
            )
            new_cache.append(layer_cache)
        new_cache = None if cache is None else tuple(new_cache)
        if self.scan_layers:
            rest = range(unrolled, s.num_layers)
            per_layer = (cross_kv, jnp.arange(unrolled, s.num_layers, dtype=jnp.int32),
                         jnp.array([s.is_local(i) for i in rest]))
            if s.layer_groups:  # [groups, layers per group]
                per_layer = jax.tree.map(lambda a: a.reshape(s.layer_groups, -1, *a.shape[1:]), per_layer)
            (x, new_cache), _ = self.scanned((x, cache), per_layer, mask, cross_mask, cache_index, deterministic,
                                             distance, encoder_hidden, angles, local_mask, local_angles)
        if self.spec.pre_norm:
            x = constrain(self.final_norm(x), HIDDEN_AXES)
        self.sow(HIDDEN_STATES, "states", x)
        return x, new_cache

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
        """Bidirectional encoding.

        Args:
          input_ids: int ``[batch, length]``; attention_mask: ``[batch, length]``, nonzero = real token.
          segment_ids, positions: packed rows (several sequences per row), int32 ``[batch, length]``: which
            sequence each token belongs to (tokens attend within their own) and its position in it (see
            ``positions_for``). Relative attention needs no positions: within a sequence the distance of two
            tokens of a packed row is the distance in the row.
        Returns:
          ``(hidden [batch, length, D], pooled [batch, D] or None)`` in the compute dtype.
        """
        chex.assert_equal_shape([input_ids, attention_mask])
        mask = attention_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, keys]
        if segment_ids is not None:
            mask = mask & same_segment(segment_ids, segment_ids)
        length = input_ids.shape[1]
        distance = relative_distances(jnp.arange(length), length, None) if self.spec.relative_attention else None
        local_mask = None
        if self.spec.has_local_layers:  # sliding-window layers see the keys nearer than the window, either side
            offsets = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
            local_mask = mask & (jnp.abs(offsets) < self.spec.sliding_window)[None, None]
        hidden, _ = self._stack(input_ids, mask, positions_for(self.spec, input_ids, 0, positions), None, None,
                                None, 0, deterministic, distance, local_mask=local_mask)
        pooled = jnp.tanh(self.pooler(hidden[:, 0])) if self.spec.pooler else None
        return hidden, pooled

    def cross_kv(self, encoder_hidden: jax.Array) -> tuple[KeyValue, ...] | KeyValue:
        """Projects encoder states ``[batch, src_len, D]`` into every layer's cross-attention keys/values once:
        per layer ``[batch, heads, src_len, head_dim]``, or (scanned) one ``KeyValue`` with a leading layer axis."""
        if not self.scan_layers:
            return tuple(layer.cross_attention.project_kv(encoder_hidden) for layer in self.layers)
        # The stacked cross-attention parameters, applied layer by layer (vmap) through an unbound copy of the
        # layers' own attention module.
        attention = attention_block(self.spec, self.dtype, self.param_dtype, cross=True, parent=None)
        stacked = self.variables["params"][SCANNED_KEY]["cross_attention"]  # (decoders: no unrolled layers)
        return jax.vmap(lambda p: attention.apply({"params": p}, encoder_hidden, method="project_kv"))(stacked)

    def decode(
        self, input_ids: jax.Array, cross_kv: Sequence[KeyValue] | KeyValue | None,
        encoder_attention_mask: jax.Array, attention_mask: jax.Array | None = None,
        cache: Sequence[KeyValue] | KeyValue | None = None, cache_index: jax.Array | int = 0,
        cache_slots: jax.Array | None = None, deterministic: bool = True, encoder_hidden: jax.Array | None = None,
        segment_ids: jax.Array | None = None, encoder_segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ):
        """Causal decoding of ``input_ids [batch, q_len]`` placed at positions ``cache_index ...``.

        With relative attention each query sits at its own position, with a cache or without (transformers 4.57
        placed every query of a call with a cache at the last position, which only agrees for ``q_len == 1``).

        Args:
          cross_kv: from ``cross_kv``, batch ``kv_batch``; ``batch`` may be ``kv_batch * beams``. None: projected
            here from ``encoder_hidden [kv_batch, src_len, D]`` (each scanned layer projects its own).
          encoder_attention_mask: ``[kv_batch, src_len]``, nonzero = real source token.
          attention_mask: decoder padding ``[batch, keys]`` (keys = ``q_len`` without cache, else cache length).
          cache: per-layer ``KeyValue [batch, heads, max_length, head_dim]`` or None (no cache: keys are the
            ``q_len`` inputs themselves); or, shared by ``slots`` rows per input (``init_cache(slots=...)``),
            ``[batch // slots, heads, slots * max_length, head_dim]``. ``cache_index``: int32 scalar, traced.
          cache_slots: with a shared cache, int32 ``[batch, max_length]``: which slot holds each row's key at each
            position (see ``self_attention_mask``); the row writes its new keys into its own slot.
          segment_ids, encoder_segment_ids, positions: packed rows, without a cache and with ``batch ==
          kv_batch``: the sequence of each decoder token (it attends to earlier tokens of its own sequence and
          to the source tokens of the same id), of each source token, and each decoder token's position in its
          sequence (see ``TransformerStack.encode``).
        Returns:
          ``(logits [batch, q_len, vocab] float32, updated cache or None)``.
        """
        q_len = input_ids.shape[1]
        num_keys = q_len if cache is None else cache_rows_and_length(cache)[1]
        query_pos = cache_index + jnp.arange(q_len)
        mask = self_attention_mask(query_pos, num_keys, cache_slots)
        window = (self_attention_mask(query_pos, num_keys, cache_slots, self.spec.sliding_window)
                  if self.spec.has_local_layers else None)
        distance = relative_distances(query_pos, num_keys, cache_slots) if self.spec.relative_attention else None
        if attention_mask is not None:
            if cache_slots is not None:
                raise ValueError("a decoder attention_mask is not supported with a shared (slotted) cache")
            chex.assert_shape(attention_mask, (input_ids.shape[0], num_keys))
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        cross_mask = encoder_attention_mask.astype(bool)[:, None, None, :]  # [kv_batch, 1, 1, src_len]
        if segment_ids is not None or encoder_segment_ids is not None:
            if cache is not None or segment_ids is None or encoder_segment_ids is None:
                raise ValueError("packed rows need segment_ids and encoder_segment_ids, and no cache")
            mask = mask & same_segment(segment_ids, segment_ids)
            cross_mask = cross_mask & same_segment(segment_ids, encoder_segment_ids)
        if cross_kv is None and not self.scan_layers:
            cross_kv = self.cross_kv(encoder_hidden)
        hidden, cache = self._stack(input_ids, mask, positions_for(self.spec, input_ids, cache_index, positions),
                                    cross_kv, cross_mask, cache, cache_index, deterministic, distance, encoder_hidden,
                                    None if window is None else mask & window)
        return self.lm_head(hidden, self.embeddings), cache
