"""EncoderDecoderModel: config + module + params behind the familiar Hugging Face surface."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxencdec import loading, paths, storage
from jaxencdec.checkpoint import names
from jaxencdec.checkpoint.convert import LoadReport, float32_flat_params, params_to_state_dict
from jaxencdec.checkpoint.formats import write_msgpack, write_safetensors
from jaxencdec.checkpoint.hub import hub_upload_error
from jaxencdec.config import REMAT_POLICIES, EncoderDecoderConfig
from jaxencdec.errors import ConfigError
from jaxencdec.generation.api import generate
from jaxencdec.generation.config import GENERATION_CONFIG_FILE, GenerationConfig
from jaxencdec.inputs import (check_decoder_batch, check_dropout_rng, check_pair_shapes, mask_or_ones, traced,
                              validate_labels, validate_token_ids)
from jaxencdec.loading import CONFIG_NAME
from jaxencdec.models import layout
from jaxencdec.models.encoder_decoder import (DecoderCache, DecoderOutput, EncoderDecoderModule, EncoderOutput,
                                              Seq2SeqOutput, abstract_params, abstract_variables, apply_recording,
                                              as_encoder_output, cross_entropy_loss, empty_cache, fresh_params,
                                              shift_tokens_right, stack_records)
from jaxencdec.models.transformer import cache_rows_and_length

WEIGHTS_NAME = "flax_model.msgpack"

Params = dict[str, Any]


class EncoderDecoderModel:
    """A Flax encoder-decoder with transformers' ``EncoderDecoderModel`` surface.

    Attributes:
      config: the ``EncoderDecoderConfig`` (round-trips Hugging Face ``config.json``).
      module: the ``EncoderDecoderModule`` (pure ``init``/``apply``).
      params: the parameter tree (see ``models.transformer`` for its layout).
      generation_config: defaults for ``generate``.

    ``param_dtype`` is the dtype the parameters are stored in, ``dtype`` the compute dtype (activations and the
    generation KV cache; default: ``param_dtype``). Mixed precision as TPU training runs it: ``dtype=bfloat16``
    with float32 params (softmax, norm statistics, logits and the loss stay float32). bfloat16 inference:
    ``param_dtype=bfloat16`` (half the memory; compute and cache follow).
    """

    def __init__(self, config: EncoderDecoderConfig, params: Params | None = None, *, seed: int = 0,
                 dtype=None, param_dtype=jnp.float32, generation_config: GenerationConfig | None = None):
        self.config = config
        self.module = EncoderDecoderModule(config, dtype=param_dtype if dtype is None else dtype,
                                           param_dtype=param_dtype)
        self.params = params if params is not None else self.init_params(seed)
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self.load_report: LoadReport | None = None

    # ------------------------------------------------------------------ parameters

    def init_params(self, seed: int = 0) -> Params:
        """Fresh parameters: normal(initializer_range) kernels and embeddings, zero biases, unit norms."""
        return fresh_params(self.module, jax.random.key(seed))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Flat ``path -> shape`` of the parameter tree, without allocating it."""
        tree = abstract_params(self.module)
        return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    def logical_axes(self) -> Params:
        """The parameter tree with each leaf replaced by its logical ``PartitionSpec`` (``vocab``, ``embed``...)."""
        return nn.get_partition_spec(abstract_variables(self.module))["params"]

    def unrolled_params(self, params: Params | None = None) -> Params:
        """``params`` (default ``self.params``) in the unrolled layout (``layers_{i}``), which files hold."""
        return layout.to_layout(self.params if params is None else params, scanned=False)

    def num_parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.param_shapes().values())

    # ------------------------------------------------------------------ how the layers run

    def configure_layers(self, *, remat: str | None = None, scan_layers: bool | None = None) -> None:
        """Sets how the layers run (``EncoderDecoderConfig.remat`` / ``scan_layers``; None keeps the current
        setting): the module is rebuilt and the parameters converted to the layout asked for. What the model
        computes, and what ``save_pretrained`` writes, does not change."""
        changes = {name: value for name, value in (("remat", remat), ("scan_layers", scan_layers))
                   if value is not None}
        self.config = self.config.replace(**changes)
        self.module = EncoderDecoderModule(self.config, dtype=self.module.dtype, param_dtype=self.module.param_dtype)
        if self.params:
            self.params = layout.to_layout(self.params, self.config.scan_layers)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Mapping[str, Any] | None = None) -> None:
        """transformers' switch: every layer recomputes its activations in the backward pass (``remat="full"``).
        ``gradient_checkpointing_kwargs={"policy": name}`` picks another of ``config.REMAT_POLICIES``."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        policy = kwargs.pop("policy", "full")
        if kwargs:
            raise ValueError(f"gradient_checkpointing_kwargs: unsupported key(s) {sorted(kwargs)}; only 'policy' "
                             f"(one of {REMAT_POLICIES}) is")
        self.configure_layers(remat=policy)

    def gradient_checkpointing_disable(self) -> None:
        self.configure_layers(remat="none")

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.config.remat != "none"

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_encoder_decoder_pretrained(cls, encoder_pretrained_model_name_or_path: str,
                                        decoder_pretrained_model_name_or_path: str, *, seed: int = 0,
                                        dtype=None, param_dtype=None, torch_dtype=None, **kwargs):
        """Warm-starts from two standalone Hugging Face checkpoints (local folders, bucket URLs such as
        ``gs://bucket/bert``, or hub ids).

        ``encoder_*`` / ``decoder_*`` keyword arguments override the encoder's / decoder's config fields, the
        others the top-level config (``decoder_start_token_id``, ``pad_token_id``...), as in transformers.
        New parameters (cross-attention, a missing LM head) are listed in one log message, unused checkpoint
        tensors in another; both lists stay in ``model.load_report``.
        ``torch_dtype`` (transformers' name) or ``param_dtype``: the dtype of the loaded weights, see
        ``from_pretrained``; with ``"auto"`` both checkpoints must agree.
        """
        return loading.load_encoder_decoder_pretrained(
            cls, encoder_pretrained_model_name_or_path, decoder_pretrained_model_name_or_path, seed=seed, dtype=dtype,
            param_dtype=param_dtype, torch_dtype=torch_dtype, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, dtype=None, param_dtype=None, torch_dtype=None,
                        **config_overrides):
        """Loads an encoder-decoder folder (local, a bucket URL such as ``gs://bucket/model``, or a hub id): ours
        (``flax_model.msgpack``) or Hugging Face's
        (``model.safetensors``, sharded safetensors, ``pytorch_model.bin``, transformers 4.x ``flax_model.msgpack``).

        Every parameter must be present with the right shape, else ``CheckpointError`` lists the names.
        ``torch_dtype`` (transformers' name) or ``param_dtype``: the dtype the weights are loaded in (default
        float32): a JAX / numpy dtype, a torch dtype, a name (``"bfloat16"``), or ``"auto"``, the checkpoint's own
        (the ``dtype`` / ``torch_dtype`` of its config.json, else that of its first floating-point tensor), as in
        transformers. The compute dtype ``dtype`` follows it unless given.
        """
        return loading.load_pretrained(cls, pretrained_model_name_or_path, dtype=dtype, param_dtype=param_dtype,
                                       torch_dtype=torch_dtype, **config_overrides)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> paths.AnyPath:
        """Writes ``config.json``, ``generation_config.json`` and ``flax_model.msgpack`` into a local folder or a
        bucket URL (``gs://bucket/model``); returns the folder as a path object (``epath.Path`` for a URL).

        A local folder is replaced as a whole (``storage.atomic_folder``): if any file fails to write, the
        folder keeps the previous model, weights and config together. Other files in it (a tokenizer, a
        README) are kept; weight files of an earlier save (``model.safetensors``, ...) are removed, as they
        would shadow or contradict the new weights. On a bucket each file is one object and ``config.json`` is
        written last (``atomic_folder`` says what that guarantees).
        """
        self.generation_config.check_savable()
        with storage.atomic_folder(save_directory) as staging:
            write_msgpack(jax.tree.map(np.asarray, self.unrolled_params()), staging / WEIGHTS_NAME)
            self._write_configs(staging)
        return paths.as_path(save_directory)

    def _write_configs(self, folder: Path) -> None:
        """``config.json`` and ``generation_config.json`` into ``folder``. As transformers, config.json records
        ``architectures`` and the weights' ``dtype`` (that of the first floating-point parameter, so that
        ``from_pretrained(..., torch_dtype="auto")`` loads them back as saved)."""
        self.generation_config.save(folder / GENERATION_CONFIG_FILE)
        floating = (x for x in jax.tree.leaves(self.params) if jnp.issubdtype(x.dtype, jnp.floating))
        weights_dtype = next(floating, np.zeros((), np.float32)).dtype
        storage.write_json({**self.config.to_dict(), "dtype": jnp.dtype(weights_dtype).name,
                       "architectures": ["EncoderDecoderModel"]}, folder / CONFIG_NAME)

    def pytorch_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters under Hugging Face PyTorch names (float32), tied tensors omitted as transformers does."""
        return params_to_state_dict(names.encoder_decoder_rules(self.config),
                                    float32_flat_params(self.unrolled_params()))

    def export_pytorch(self, save_directory: str | os.PathLike) -> paths.AnyPath:
        """Writes a folder transformers' ``EncoderDecoderModel.from_pretrained`` loads: ``model.safetensors``,
        ``config.json``, ``generation_config.json``; local or on a bucket, replaced as ``save_pretrained`` does."""
        self.generation_config.check_savable()
        with storage.atomic_folder(save_directory) as staging:
            write_safetensors(self.pytorch_state_dict(), staging / "model.safetensors", metadata={"format": "pt"})
            self._write_configs(staging)
        return paths.as_path(save_directory)

    def export_part_pytorch(self, part: str, save_directory: str | os.PathLike) -> paths.AnyPath:
        """Writes the ``part`` ("encoder" or "decoder") alone as a transformers folder of its own architecture
        (``model.safetensors`` under ``AutoModel`` / ``*ForCausalLM`` names, the part's ``config.json``). A
        Llama-family decoder loads back into ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``; its cross-attention
        tensors lie beside the LLM's, which transformers reports as unused."""
        return loading.export_part(self.config, float32_flat_params(self.unrolled_params()), part, save_directory)

    def push_to_hub(self, repo_id: str | None = None, *args, **kwargs):
        """Not implemented: raises NotImplementedError with the two calls that do it (``save_pretrained``, then
        ``huggingface_hub.upload_folder``). Takes transformers' arguments so that any such call gets that message."""
        raise hub_upload_error("model", repo_id)

    # ------------------------------------------------------------------ forward

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, *, encoder_outputs=None, output_attentions: bool = False,
                 output_hidden_states: bool = False, params: Params | None = None,
                 dropout_rng: jax.Array | None = None, train: bool = False,
                 return_dict: bool = True) -> Seq2SeqOutput | tuple:
        """Teacher-forced forward pass, as transformers' ``EncoderDecoderModel.forward``.

        With ``labels`` and no ``decoder_input_ids``, the decoder inputs are the labels shifted right with
        ``decoder_start_token_id`` and -100 turned into ``pad_token_id`` (and the decoder mask hides pads);
        the loss is the mean cross-entropy over labels != -100.
        Ids and labels must be integer arrays (float ones are an error, as in transformers), masks hold 0 and 1
        (bool, int or float); every shape mismatch is a ValueError naming the arguments (``jaxencdec.inputs``).

        ``encoder_outputs``: an ``EncoderOutput`` from ``encode`` (or a tuple whose first element is the encoder's
        last hidden state ``[batch, src_len, D_enc]``, or that array): the encoder is skipped, ``input_ids`` is
        not read, and ``attention_mask`` masks those states. ``output_attentions`` / ``output_hidden_states``
        (static: a change compiles again) fill the output's ``encoder_attentions``, ``decoder_attentions``,
        ``cross_attentions`` (per layer ``[batch, heads, q_len, k_len]`` float32 softmax probabilities, before
        attention dropout) and ``encoder_hidden_states``, ``decoder_hidden_states`` (layers + 1 arrays: the
        embeddings, then each layer's output), as transformers returns them; with ``encoder_outputs`` the encoder
        fields are those it carries.
        Returns ``Seq2SeqOutput(logits [batch, tgt_len, vocab], encoder_last_hidden_state, loss, ...)``; with
        ``return_dict=False`` its set fields as a tuple in transformers' order (``loss`` first when computed).
        """
        enc, dec = self.config.encoder_spec, self.config.decoder_spec
        encoder_hidden = None
        if encoder_outputs is None:
            input_ids = validate_token_ids(input_ids, enc.vocab_size, enc.max_length, "input_ids")
            attention_mask = mask_or_ones(attention_mask, input_ids, "attention_mask")
        else:
            encoder_hidden, attention_mask = self._encoder_states(encoder_outputs, attention_mask, "attention_mask")
            input_ids = None
        if labels is None and decoder_input_ids is None:
            raise ValueError("pass decoder_input_ids or labels")
        if labels is not None:
            labels = validate_labels(labels, dec.vocab_size, dec.max_length)
        if decoder_input_ids is not None:
            decoder_input_ids = validate_token_ids(decoder_input_ids, dec.vocab_size, dec.max_length,
                                                   "decoder_input_ids")
        if encoder_hidden is None:
            check_pair_shapes(input_ids, decoder_input_ids, labels)
        else:
            check_decoder_batch(encoder_hidden, {"decoder_input_ids": decoder_input_ids, "labels": labels})
            if decoder_input_ids is not None:  # the batches agree: only labels vs decoder_input_ids is left
                check_pair_shapes(decoder_input_ids, decoder_input_ids, labels)
        if decoder_input_ids is None:
            decoder_input_ids = self._decoder_inputs_from_labels(labels)
            if decoder_attention_mask is None:
                decoder_attention_mask = (decoder_input_ids != self.config.pad_token_id).astype(np.int32)
        if decoder_attention_mask is not None:
            decoder_attention_mask = mask_or_ones(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask")
        check_dropout_rng(train, dropout_rng)
        out = _forward(self.module, params if params is not None else self.params, input_ids, attention_mask,
                       decoder_input_ids, decoder_attention_mask, labels, dropout_rng, not train, encoder_hidden,
                       output_attentions, output_hidden_states)
        if encoder_outputs is not None:  # as transformers: the encoder fields it was given
            given = as_encoder_output(encoder_outputs)
            if isinstance(given, EncoderOutput):
                out = out.replace(encoder_hidden_states=given.hidden_states, encoder_attentions=given.attentions)
        return out if return_dict else out.to_tuple()

    def _encoder_states(self, encoder_outputs, attention_mask, mask_name: str) -> tuple[Any, np.ndarray]:
        """The encoder's last hidden state ``[batch, src_len, D_enc]`` held by ``encoder_outputs`` (an
        ``EncoderOutput``, a mapping with ``"last_hidden_state"`` as transformers' ``BaseModelOutput``, a tuple
        whose first element it is, or the array), checked, and its int32 mask."""
        encoder_outputs = as_encoder_output(encoder_outputs)
        hidden = (encoder_outputs.last_hidden_state if isinstance(encoder_outputs, EncoderOutput)
                  else encoder_outputs)
        hidden = hidden if isinstance(hidden, (jax.Array, np.ndarray)) else np.asarray(hidden)
        width = self.config.encoder.hidden
        if hidden.ndim != 3 or hidden.shape[0] == 0 or hidden.shape[2] != width:
            raise ValueError(f"encoder_outputs must hold the encoder's last hidden state [batch, src_len, {width}] "
                             f"(model.encode(...) returns it), got shape {hidden.shape}")
        if not jnp.issubdtype(hidden.dtype, jnp.floating):
            raise ValueError(f"encoder_outputs must hold floating-point states, got dtype {hidden.dtype}")
        if attention_mask is not None and np.shape(attention_mask) != hidden.shape[:2]:
            raise ValueError(f"{mask_name} has shape {np.shape(attention_mask)}, but the encoder states are "
                             f"[batch, src_len] = {hidden.shape[:2]}: it masks their source positions")
        return hidden, mask_or_ones(attention_mask, np.zeros(hidden.shape[:2], np.int32), mask_name)

    def _decoder_inputs_from_labels(self, labels):
        """int32 ``[batch, tgt_len]``: ``labels`` shifted right behind ``decoder_start_token_id``, -100 -> pad."""
        for name in ("decoder_start_token_id", "pad_token_id"):
            if getattr(self.config, name) is None:
                raise ConfigError(f"config.{name} must be set to build decoder inputs from labels")
        shifted = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        shifted = shifted if traced(shifted) else np.asarray(shifted)
        dec = self.config.decoder_spec
        return validate_token_ids(shifted, dec.vocab_size, dec.max_length,
                                  "decoder_input_ids (built from labels with config.decoder_start_token_id)")

    # ------------------------------------------------------------------ encode / decode, for custom loops

    def encode(self, input_ids, attention_mask=None, output_attentions: bool = False,
               output_hidden_states: bool = False, *, params: Params | None = None,
               dropout_rng: jax.Array | None = None, train: bool = False) -> EncoderOutput:
        """Runs the encoder alone, as transformers' ``FlaxEncoderDecoderModel.encode``.

        Args:
          input_ids: int ``[batch, src_len]``; attention_mask: ``[batch, src_len]`` of 0/1, or None (all ones).
          output_attentions, output_hidden_states: also return per layer attention probabilities / the hidden
            states (static: a change compiles again).
        Returns:
          ``EncoderOutput(last_hidden_state [batch, src_len, D_enc], hidden_states, attentions)``, for ``decode``
          and ``__call__(encoder_outputs=...)``: encode a source once, then decode or score many targets.
        """
        spec = self.config.encoder_spec
        input_ids = validate_token_ids(input_ids, spec.vocab_size, spec.max_length, "input_ids")
        attention_mask = mask_or_ones(attention_mask, input_ids, "attention_mask")
        check_dropout_rng(train, dropout_rng)
        return _encode(self.module, params if params is not None else self.params, input_ids, attention_mask,
                       dropout_rng, not train, output_attentions, output_hidden_states)

    def init_cache(self, batch_size: int, max_length: int, encoder_outputs=None) -> DecoderCache:
        """An empty decoder cache (``past_key_values``) for ``batch_size`` rows and up to ``max_length`` decoder
        positions, as transformers' ``FlaxEncoderDecoderModel.init_cache``.

        Keys/values ``[batch_size, heads, max_length, head_dim]`` per decoder layer in the compute dtype, and the
        number of positions written (0). ``encoder_outputs`` is optional (transformers needed it to trace the
        decoder); when given, ``batch_size`` is checked against its batch (equal, or a multiple).
        """
        spec = self.config.decoder_spec
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_length > spec.max_length:
            raise ValueError(f"max_length {max_length} is more than the {spec.max_length} positions the decoder "
                             "embeds")
        if encoder_outputs is not None:
            hidden, _ = self._encoder_states(encoder_outputs, None, "attention_mask")
            check_decoder_batch(hidden, {"init_cache(batch_size=...)": np.zeros((batch_size, 1))}, multiple=True)
        return empty_cache(self.config, int(batch_size), int(max_length), self.module.dtype)

    def decode(self, decoder_input_ids, encoder_outputs, encoder_attention_mask=None, decoder_attention_mask=None,
               past_key_values: DecoderCache | None = None, output_attentions: bool = False,
               output_hidden_states: bool = False, *, params: Params | None = None,
               dropout_rng: jax.Array | None = None, train: bool = False) -> DecoderOutput:
        """Runs the decoder on encoder outputs, as transformers' ``FlaxEncoderDecoderModel.decode``.

        Args:
          decoder_input_ids: int ``[batch, q_len]``: the whole target (no cache), or the next token(s) (cache).
            ``batch`` may be a multiple ``k`` of the encoder batch: rows ``b * k ... b * k + k - 1`` read input
            ``b``, so many candidates are scored against one encoded source without repeating it.
          encoder_outputs: from ``encode`` (or a tuple whose first element is the last hidden state, or that
            array ``[enc_batch, src_len, D_enc]``).
          encoder_attention_mask: ``[enc_batch, src_len]`` of 0/1, or None (all ones).
          decoder_attention_mask: 0/1 over the keys, ``[batch, q_len]`` without a cache, ``[batch, max_length]``
            (the cache's positions) with one; None: causal only.
          past_key_values: a ``DecoderCache`` from ``init_cache`` or from the previous call's output; the tokens
            then sit at positions ``past_key_values.index ...`` (transformers' Flax model took position ids
            instead; here the cache counts them).
          output_attentions, output_hidden_states: also return per layer self- and cross-attention probabilities
            / the hidden states (static: a change compiles again).
        Returns:
          ``DecoderOutput(logits [batch, q_len, vocab] float32, past_key_values (advanced by q_len, or None),
          hidden_states, attentions, cross_attentions)``.
        """
        spec = self.config.decoder_spec
        ids = validate_token_ids(decoder_input_ids, spec.vocab_size, spec.max_length, "decoder_input_ids")
        hidden, encoder_mask = self._encoder_states(encoder_outputs, encoder_attention_mask,
                                                    "encoder_attention_mask")
        check_decoder_batch(hidden, {"decoder_input_ids": ids}, multiple=True)
        keys = ids.shape[1]
        if past_key_values is not None:
            keys = _check_cache(past_key_values, ids)
        if decoder_attention_mask is not None:
            if np.shape(decoder_attention_mask) != (ids.shape[0], keys):
                raise ValueError(f"decoder_attention_mask has shape {np.shape(decoder_attention_mask)}; it must be "
                                 f"[batch, keys] = {(ids.shape[0], keys)} (keys: the cache's max_length with "
                                 "past_key_values, else the decoder_input_ids' length)")
            decoder_attention_mask = mask_or_ones(decoder_attention_mask, np.zeros((ids.shape[0], keys), np.int32),
                                                  "decoder_attention_mask")
        check_dropout_rng(train, dropout_rng)
        return _decode(self.module, params if params is not None else self.params, ids, hidden, encoder_mask,
                       decoder_attention_mask, past_key_values, dropout_rng, not train, output_attentions,
                       output_hidden_states)

    # ------------------------------------------------------------------ parameter dtypes

    def to_bf16(self, params: Params | None = None, mask: Params | None = None) -> Params:
        """``params`` (default ``self.params``) with floating-point leaves cast to bfloat16, as transformers'
        Flax ``to_bf16``; ``mask``: a tree like ``params`` of bools, True where to cast. Returns a new tree (assign
        it to ``model.params``); the compute dtype stays the model's ``dtype``."""
        return _cast_floating(self.params if params is None else params, jnp.bfloat16, mask)

    def to_fp16(self, params: Params | None = None, mask: Params | None = None) -> Params:
        """As ``to_bf16``, to float16."""
        return _cast_floating(self.params if params is None else params, jnp.float16, mask)

    def to_fp32(self, params: Params | None = None, mask: Params | None = None) -> Params:
        """As ``to_bf16``, to float32 (e.g. back from half precision)."""
        return _cast_floating(self.params if params is None else params, jnp.float32, mask)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids, attention_mask=None, generation_config: GenerationConfig | None = None,
                 prng_key: jax.Array | None = None, *, params: Params | None = None, **kwargs):
        """Generates with transformers' ``generate`` semantics; see ``jaxencdec.generation.api.generate``.

        Returns int32 ``[batch * num_return_sequences, length]`` sequences; with ``return_dict_in_generate=True``
        a ``GenerateOutput``: ``sequences``, ``sequences_scores`` (beams, with ``output_scores``) and, as
        transformers returns them (numpy arrays), ``encoder_attentions`` / ``encoder_hidden_states`` (per encoder
        layer, ``[batch, ...]``, not repeated per beam) and, per decoder step ``t`` and layer,
        ``decoder_attentions [rows, heads, 1, t + 1]``, ``cross_attentions [rows, heads, 1, src_len]`` (with
        ``output_attentions=True``) and ``decoder_hidden_states`` (layers + 1 x ``[rows, 1, D_dec]``, with
        ``output_hidden_states=True``); ``rows`` is ``batch * num_beams`` for beam search (the beams live at that
        step), else ``batch * num_return_sequences``.
        """
        return generate(self, input_ids, attention_mask, generation_config, prng_key, params=params, **kwargs)


@partial(jax.jit, static_argnums=(0, 8, 10, 11))
def _forward(module, params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels,
             dropout_rng, deterministic, encoder_hidden=None, output_attentions=False, output_hidden_states=False):
    """Jitted forward (+ loss). Static: ``module``, ``deterministic`` and the two output flags (a change
    recompiles); traced: params, ids, masks, labels, rng, encoder states (with them ``input_ids`` is None).
    Recompiles per distinct input shape (and per None/array for optional inputs)."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    out, records = apply_recording(module, {"params": params}, input_ids, attention_mask, decoder_input_ids,
                                   decoder_attention_mask, deterministic=deterministic,
                                   encoder_hidden_states=encoder_hidden, rngs=rngs,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states)
    if records:
        encoder = stack_records(records, "encoder", module.config.encoder_spec)
        decoder = stack_records(records, "decoder", module.config.decoder_spec)
        out = out.replace(encoder_hidden_states=encoder["hidden_states"], encoder_attentions=encoder["attentions"],
                          decoder_hidden_states=decoder["hidden_states"], decoder_attentions=decoder["attentions"],
                          cross_attentions=decoder["cross_attentions"])
    if labels is not None:
        out = out.replace(loss=cross_entropy_loss(out.logits, labels))
    return out


@partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _encode(module, params, input_ids, attention_mask, dropout_rng, deterministic, output_attentions,
            output_hidden_states) -> EncoderOutput:
    """Jitted encoder. Static: ``module``, ``deterministic``, the output flags; traced: the rest."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    hidden, records = apply_recording(module, {"params": params}, input_ids, attention_mask, deterministic,
                                      method="encode", rngs=rngs, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states)
    recorded = stack_records(records, "encoder", module.config.encoder_spec)
    return EncoderOutput(hidden, recorded["hidden_states"], recorded["attentions"])


@partial(jax.jit, static_argnums=(0, 8, 9, 10))
def _decode(module, params, decoder_input_ids, encoder_hidden, encoder_mask, decoder_mask, cache, dropout_rng,
            deterministic, output_attentions, output_hidden_states) -> DecoderOutput:
    """Jitted decoder step(s). Static: ``module``, ``deterministic``, the output flags; traced: the rest (the
    cache's index too: one compilation serves every step of a loop)."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    (logits, cache), records = apply_recording(
        module, {"params": params}, decoder_input_ids, encoder_hidden, encoder_mask, decoder_mask, cache,
        deterministic, method="decode_states", rngs=rngs, output_attentions=output_attentions,
        output_hidden_states=output_hidden_states)
    return DecoderOutput(logits, cache, **stack_records(records, "decoder", module.config.decoder_spec))


def _check_cache(cache: DecoderCache, ids: np.ndarray) -> int:
    """Checks that ``cache`` fits the decoder inputs ``ids [batch, q_len]`` and has room for them; returns its
    ``max_length``. (Reads the cache's index from the device: past the end, positions would be clamped.)"""
    if not isinstance(cache, DecoderCache):
        raise ValueError(f"past_key_values must be a DecoderCache (model.init_cache(...) or a decode output's "
                         f"past_key_values), got {type(cache).__name__}")
    rows, _ = cache_rows_and_length(cache.layers)
    if rows != ids.shape[0]:
        raise ValueError(f"past_key_values holds {rows} rows but decoder_input_ids has "
                         f"{ids.shape[0]}; use model.init_cache({ids.shape[0]}, max_length)")
    written = int(cache.index)
    if written + ids.shape[1] > cache.max_length:
        raise ValueError(f"past_key_values holds {written} of its {cache.max_length} positions: no room for "
                         f"{ids.shape[1]} more token(s); use init_cache with a larger max_length")
    return cache.max_length


def _cast_floating(params: Params, dtype, mask: Params | None) -> Params:
    """``params`` with floating-point leaves (where ``mask`` is True, when given) cast to ``dtype``."""
    def cast(leaf, wanted=True):
        return leaf.astype(dtype) if wanted and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    if mask is None:
        return jax.tree.map(cast, params)
    if jax.tree.structure(mask) != jax.tree.structure(params):
        raise ValueError("mask must be a tree of bools with the structure of params (e.g. built with "
                         "flax.traverse_util.flatten_dict / unflatten_dict over params)")
    return jax.tree.map(cast, params, mask)
