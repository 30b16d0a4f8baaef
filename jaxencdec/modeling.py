"""EncoderDecoderModel: config + module + params behind the familiar Hugging Face surface."""

from __future__ import annotations

import dataclasses
import logging
import re
import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxencdec.checkpoint import io, names
from jaxencdec.checkpoint.convert import LoadReport, params_to_state_dict, state_dict_to_params
from jaxencdec.config import ConfigError, EncoderDecoderConfig, HFConfig
from jaxencdec.generation.api import generate
from jaxencdec.generation.config import GenerationConfig
from jaxencdec.inputs import mask_or_ones, validate_token_ids
from jaxencdec.models.encoder_decoder import (EncoderDecoderModule, Seq2SeqOutput, cross_entropy_loss,
                                              shift_tokens_right)

logger = logging.getLogger("jaxencdec")

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "flax_model.msgpack"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.msgpack", "*.bin", "*.txt", "*.model"]

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

    def _init_fn(self, rng):
        ids = jnp.ones((1, 1), jnp.int32)
        return self.module.init(rng, ids, ids, ids)

    def init_params(self, seed: int = 0) -> Params:
        """Fresh parameters: normal(initializer_range) kernels and embeddings, zero biases, unit norms."""
        return nn.unbox(jax.jit(self._init_fn)(jax.random.key(seed)))["params"]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Flat ``path -> shape`` of the parameter tree, without allocating it."""
        tree = nn.unbox(jax.eval_shape(self._init_fn, jax.random.key(0)))["params"]
        return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    def logical_axes(self) -> Params:
        """The parameter tree with each leaf replaced by its logical ``PartitionSpec`` (``vocab``, ``embed``...)."""
        return nn.get_partition_spec(jax.eval_shape(self._init_fn, jax.random.key(0)))["params"]

    def num_parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.param_shapes().values())

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_encoder_decoder_pretrained(cls, encoder_pretrained_model_name_or_path: str,
                                        decoder_pretrained_model_name_or_path: str, *, seed: int = 0,
                                        dtype=None, param_dtype=jnp.float32, **kwargs):
        """Warm-starts from two standalone Hugging Face checkpoints (local folders or hub ids).

        ``encoder_*`` / ``decoder_*`` keyword arguments override the encoder's / decoder's config fields, the
        others the top-level config (``decoder_start_token_id``, ``pad_token_id``...), as in transformers.
        New parameters (cross-attention, a missing LM head) are listed in one log message, unused checkpoint
        tensors in another; both lists stay in ``model.load_report``.
        """
        parts = {}
        for role, source in (("encoder", encoder_pretrained_model_name_or_path),
                             ("decoder", decoder_pretrained_model_name_or_path)):
            folder = io.resolve_model_folder(source, HUB_PATTERNS)
            overrides = {k[len(role) + 1:]: kwargs.pop(k) for k in list(kwargs)
                         if k.startswith(role + "_") and k not in TOP_LEVEL_FIELDS}
            parts[role] = (folder, _with_overrides(HFConfig.from_json_file(folder / CONFIG_NAME), overrides))
        unknown = set(kwargs) - TOP_LEVEL_FIELDS
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)}: use encoder_<field> / decoder_<field> for the "
                              f"parts' config fields, or one of {sorted(TOP_LEVEL_FIELDS)}")
        config = EncoderDecoderConfig.from_encoder_decoder_configs(parts["encoder"][1], parts["decoder"][1], **kwargs)
        model = cls(config, seed=seed, dtype=dtype, param_dtype=param_dtype)
        flat = traverse_util.flatten_dict(model.params, sep="/")
        shapes = {k: v.shape for k, v in flat.items()}
        report = LoadReport()
        for role, (folder, part) in parts.items():
            spec = config.encoder_spec if role == "encoder" else config.decoder_spec
            rules = names.stack_rules(part.model_type, spec, role, "", role)
            loaded, part_report = state_dict_to_params(
                rules, io.read_state_dict(folder), shapes, partial(names.alternative_names, part.model_type, role))
            part_report.raise_for_mismatch(str(folder))
            flat.update({k: jnp.asarray(v, flat[k].dtype) for k, v in loaded.items()})
            report.missing += part_report.missing
            report.unexpected += [f"{role}: {n}" for n in part_report.unexpected]
        if config.needs_projection:
            report.missing += [k for k in flat if k.startswith("enc_to_dec_proj/")]
        if report.missing:
            logger.warning("Newly initialized parameters (not in the checkpoints; train them): %s",
                           summarize_paths(report.missing))
        if report.unexpected:
            logger.warning("Checkpoint tensors not used by the model: %s", ", ".join(report.unexpected))
        model.params = traverse_util.unflatten_dict(flat, sep="/")
        model.load_report = report
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, dtype=None, param_dtype=jnp.float32,
                        **config_overrides):
        """Loads an encoder-decoder folder (or hub id): ours (``flax_model.msgpack``) or Hugging Face's
        (``model.safetensors``, sharded safetensors, ``pytorch_model.bin``, transformers 4.x ``flax_model.msgpack``).

        Every parameter must be present with the right shape, else ``CheckpointError`` lists the names.
        """
        folder = io.resolve_model_folder(pretrained_model_name_or_path, HUB_PATTERNS)
        config = EncoderDecoderConfig.from_json_file(folder / CONFIG_NAME)
        if config_overrides:
            config = config.replace(**config_overrides)
        generation_path = folder / GENERATION_CONFIG_NAME
        generation_config = (GenerationConfig.from_json_file(generation_path) if generation_path.exists()
                             else GenerationConfig.from_model_config(config))
        shell = cls(config, params={}, dtype=dtype, param_dtype=param_dtype, generation_config=generation_config)
        shapes = shell.param_shapes()
        kind, files = io.find_weights(folder)
        tree = io.read_msgpack(files[0]) if kind == "flax" and len(files) == 1 else None
        if tree is not None and _is_own_tree(tree):
            flat = traverse_util.flatten_dict(tree, sep="/")
            report = _compare_tree(flat, shapes)
        else:
            state_dict = io.read_state_dict(folder) if tree is None else io.hf_flax_to_state_dict(tree, files[0])
            flat, report = state_dict_to_params(names.encoder_decoder_rules(config), state_dict, shapes)
        report.raise_for_mismatch(str(folder))
        report.raise_for_missing(str(folder))
        if report.unexpected:
            logger.warning("%s: checkpoint tensors not used by the model: %s", folder, ", ".join(report.unexpected))
        shell.params = traverse_util.unflatten_dict(
            {k: jnp.asarray(v, param_dtype) for k, v in flat.items() if k in shapes}, sep="/")
        shell.load_report = report
        return shell

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Writes ``config.json``, ``generation_config.json`` and ``flax_model.msgpack`` (each atomically)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        io.write_msgpack(jax.tree.map(np.asarray, self.params), folder / WEIGHTS_NAME)
        self.generation_config.save(folder / GENERATION_CONFIG_NAME)
        io.write_json({**self.config.to_dict(), "architectures": ["EncoderDecoderModel"]}, folder / CONFIG_NAME)
        return folder

    def pytorch_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters under Hugging Face PyTorch names (float32), tied tensors omitted as transformers does."""
        flat = traverse_util.flatten_dict(jax.tree.map(lambda x: np.asarray(x, np.float32), self.params), sep="/")
        return params_to_state_dict(names.encoder_decoder_rules(self.config), flat)

    def export_pytorch(self, save_directory: str | os.PathLike) -> Path:
        """Writes a folder transformers' ``EncoderDecoderModel.from_pretrained`` loads: ``model.safetensors``,
        ``config.json``, ``generation_config.json``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        io.write_safetensors(self.pytorch_state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
        self.generation_config.save(folder / GENERATION_CONFIG_NAME)
        io.write_json({**self.config.to_dict(), "architectures": ["EncoderDecoderModel"]}, folder / CONFIG_NAME)
        return folder

    # ------------------------------------------------------------------ forward

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, *, params: Params | None = None, dropout_rng: jax.Array | None = None,
                 train: bool = False) -> Seq2SeqOutput:
        """Teacher-forced forward pass, as transformers' ``EncoderDecoderModel.forward``.

        With ``labels`` and no ``decoder_input_ids``, the decoder inputs are the labels shifted right with
        ``decoder_start_token_id`` and -100 turned into ``pad_token_id`` (and the decoder mask hides pads);
        the loss is the mean cross-entropy over labels != -100.
        Returns ``Seq2SeqOutput(logits [batch, tgt_len, vocab], encoder_last_hidden_state, loss)``.
        """
        enc, dec = self.config.encoder_spec, self.config.decoder_spec
        input_ids = validate_token_ids(input_ids, enc.vocab_size, enc.max_length, "input_ids")
        attention_mask = mask_or_ones(attention_mask, input_ids, "attention_mask")
        if labels is not None:
            labels = np.asarray(labels).astype(np.int32)
            if decoder_input_ids is None:
                for name in ("decoder_start_token_id", "pad_token_id"):
                    if getattr(self.config, name) is None:
                        raise ConfigError(f"config.{name} must be set to build decoder inputs from labels")
                decoder_input_ids = np.asarray(shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id))
                if decoder_attention_mask is None:
                    decoder_attention_mask = (decoder_input_ids != self.config.pad_token_id).astype(np.int32)
            validate_token_ids(np.where(labels == -100, 0, labels), dec.vocab_size, dec.max_length, "labels")
        if decoder_input_ids is None:
            raise ValueError("pass decoder_input_ids or labels")
        decoder_input_ids = validate_token_ids(decoder_input_ids, dec.vocab_size, dec.max_length, "decoder_input_ids")
        if decoder_attention_mask is not None:
            decoder_attention_mask = mask_or_ones(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask")
        if train and dropout_rng is None:
            raise ValueError("train=True needs a dropout_rng")
        return _forward(self.module, params if params is not None else self.params, input_ids, attention_mask,
                        decoder_input_ids, decoder_attention_mask, labels, dropout_rng, not train)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids, attention_mask=None, generation_config: GenerationConfig | None = None,
                 prng_key: jax.Array | None = None, *, params: Params | None = None, **kwargs):
        """Generates with transformers' ``generate`` semantics; see ``jaxencdec.generation.api.generate``."""
        return generate(self, input_ids, attention_mask, generation_config, prng_key, params=params, **kwargs)


@partial(jax.jit, static_argnums=(0, 8))
def _forward(module, params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels,
             dropout_rng, deterministic):
    """Jitted forward (+ loss). Static: ``module`` and ``deterministic`` (a change recompiles); traced: params,
    ids, masks, labels, rng. Recompiles per distinct input shape (and per None/array for optional inputs)."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    out = module.apply({"params": params}, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                       deterministic=deterministic, rngs=rngs)
    if labels is not None:
        out = out.replace(loss=cross_entropy_loss(out.logits, labels))
    return out


def summarize_paths(paths: list[str]) -> str:
    """``a/layers_0/x/kernel, a/layers_1/x/kernel`` -> ``a/layers_{0,1}/x/kernel``: one entry per layer pattern."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        layer = re.search(r"layers_(\d+)", path)
        key = re.sub(r"layers_\d+", "layers_{}", path, count=1)
        groups.setdefault(key, []).append(layer.group(1) if layer else "")
    return ", ".join(k.replace("{}", "{" + ",".join(v) + "}") if "{}" in k else k for k, v in groups.items())


TOP_LEVEL_FIELDS = {f.name for f in dataclasses.fields(EncoderDecoderConfig)} - {"encoder", "decoder", "extra"}


def _with_overrides(config: HFConfig, overrides: Mapping[str, Any]) -> HFConfig:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ConfigError(f"{type(config).__name__} has no field(s) {sorted(unknown)}")
    return config.replace(**overrides) if overrides else config


def _is_own_tree(tree: Mapping) -> bool:
    """Our msgpack trees name layers ``layers_{i}``; transformers' Flax trees use ``layer/{i}`` or ``h/{i}``."""
    return any("/layers_0/" in k for k in traverse_util.flatten_dict(tree, sep="/"))


def _compare_tree(flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> LoadReport:
    report = LoadReport(missing=sorted(set(shapes) - set(flat)), unexpected=sorted(set(flat) - set(shapes)))
    report.mismatched = [f"{k} {tuple(np.shape(v))} vs expected {shapes[k]}" for k, v in flat.items()
                         if k in shapes and tuple(np.shape(v)) != tuple(shapes[k])]
    return report
