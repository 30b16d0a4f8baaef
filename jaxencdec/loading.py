"""Pretrained weights into an ``EncoderDecoderModel``: the work of its ``from_pretrained`` (one encoder-decoder
folder) and ``from_encoder_decoder_pretrained`` (two standalone checkpoints), with the dtype the weights load in
(``param_dtype`` / transformers' ``torch_dtype``, ``"auto"``) and the report of new and unused tensors; and the way
back to one standalone checkpoint (``export_part``).

Both take the model class to build (``EncoderDecoderModel``, or a subclass) as their first argument; their
keyword arguments and errors are those the two class methods document.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxencdec import paths, storage
from jaxencdec.checkpoint import names
from jaxencdec.checkpoint.convert import LoadReport, params_to_state_dict, state_dict_to_params
from jaxencdec.checkpoint.formats import hf_flax_to_state_dict, read_msgpack, write_safetensors
from jaxencdec.checkpoint.hub import resolve_model_folder
from jaxencdec.checkpoint.weights import find_weights, read_state_dict
from jaxencdec.config import RUNTIME_FLAGS, EncoderDecoderConfig, HFConfig
from jaxencdec.errors import ConfigError, require
from jaxencdec.generation.config import GENERATION_CONFIG_FILE, GenerationConfig
from jaxencdec.models import layout
from jaxencdec.models.encoder_decoder import abstract_params, fresh_params

logger = logging.getLogger("jaxencdec")

CONFIG_NAME = "config.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.msgpack", "*.bin", "*.txt", "*.model"]


def load_encoder_decoder_pretrained(model_class, encoder_source: str, decoder_source: str, *, seed: int = 0,
                                    dtype=None, param_dtype=None, torch_dtype=None, **kwargs):
    """``model_class.from_encoder_decoder_pretrained``: the two checkpoints' weights into a new model, the
    parameters they lack initialized from ``seed``."""
    requested_dtype = _requested_weights_dtype(param_dtype, torch_dtype)
    parts = {}
    for role, source in (("encoder", encoder_source), ("decoder", decoder_source)):
        folder = resolve_model_folder(source, HUB_PATTERNS)
        overrides = {k[len(role) + 1:]: kwargs.pop(k) for k in list(kwargs)
                     if k.startswith(role + "_") and k not in TOP_LEVEL_FIELDS}
        parts[role] = (folder, _with_overrides(HFConfig.from_json_file(folder / CONFIG_NAME), overrides))
    unknown = set(kwargs) - TOP_LEVEL_FIELDS - RUNTIME_FLAGS
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}: use encoder_<field> / decoder_<field> for the "
                          f"parts' config fields, or one of {sorted(TOP_LEVEL_FIELDS)}")
    config = EncoderDecoderConfig.from_encoder_decoder_configs(parts["encoder"][1], parts["decoder"][1], **kwargs)
    param_dtype = requested_dtype if requested_dtype != "auto" else _agreed_dtype(
        {role: _checkpoint_dtype(part.extra, partial(read_state_dict, folder))
         for role, (folder, part) in parts.items()})
    model = model_class(config, params={}, dtype=dtype, param_dtype=param_dtype)
    unrolled = jax.eval_shape(partial(layout.to_layout, scanned=False), abstract_params(model.module))
    shaped = traverse_util.flatten_dict(unrolled, sep="/")  # path -> ShapeDtypeStruct, nothing allocated
    shapes = {k: v.shape for k, v in shaped.items()}
    flat, report = {}, LoadReport()
    for role, (folder, part) in parts.items():
        spec = config.encoder_spec if role == "encoder" else config.decoder_spec
        rules = names.stack_rules(part.model_type, spec, role, "", role, tied=config.tie_encoder_decoder)
        loaded, part_report = state_dict_to_params(
            rules, read_state_dict(folder), shapes, partial(names.alternative_names, part.model_type, role))
        part_report.raise_for_mismatch(str(folder))
        flat.update({k: jnp.asarray(v, shaped[k].dtype) for k, v in loaded.items()})
        report.missing += part_report.missing
        report.unexpected += [f"{role}: {n}" for n in part_report.unexpected]
    if config.needs_projection:
        report.missing += [k for k in shaped if k.startswith("enc_to_dec_proj/")]
    # what the checkpoints lack starts as a fresh model of this seed would (the projection included)
    flat.update(_init_unrolled(model, [k for k in shaped if k not in flat], seed))
    if report.missing:
        logger.warning("Newly initialized parameters (not in the checkpoints; train them): %s",
                       summarize_paths(report.missing))
    if report.unexpected:
        logger.warning("Checkpoint tensors not used by the model: %s", ", ".join(report.unexpected))
    model.params = layout.to_layout(traverse_util.unflatten_dict(flat, sep="/"), config.scan_layers)
    model.load_report = report
    return model


def load_pretrained(model_class, source: str, *, dtype=None, param_dtype=None, torch_dtype=None,
                    **config_overrides):
    """``model_class.from_pretrained``: an encoder-decoder folder's config, generation config and weights."""
    requested_dtype = _requested_weights_dtype(param_dtype, torch_dtype)
    folder = resolve_model_folder(source, HUB_PATTERNS)
    config = EncoderDecoderConfig.from_json_file(folder / CONFIG_NAME)
    if config_overrides:
        config = config.replace(**config_overrides)
    generation_path = folder / GENERATION_CONFIG_FILE
    generation_config = (GenerationConfig.from_json_file(generation_path) if paths.exists(generation_path)
                         else GenerationConfig.from_model_config(config))
    # shapes do not depend on the dtypes; files hold the unrolled layout
    shapes = model_class(config.replace(scan_layers=False), params={}).param_shapes()
    kind, files = find_weights(folder)
    tree = read_msgpack(files[0]) if kind == "flax" and len(files) == 1 else None
    if tree is not None and _is_own_tree(tree):
        flat = traverse_util.flatten_dict(tree, sep="/")
        report = _compare_tree(flat, shapes)
    else:
        state_dict = read_state_dict(folder) if tree is None else hf_flax_to_state_dict(tree, files[0])
        flat, report = state_dict_to_params(names.encoder_decoder_rules(config), state_dict, shapes)
    report.raise_for_mismatch(str(folder))
    report.raise_for_missing(str(folder))
    if report.unexpected:
        logger.warning("%s: checkpoint tensors not used by the model: %s", folder, ", ".join(report.unexpected))
    param_dtype = requested_dtype if requested_dtype != "auto" else _checkpoint_dtype(config.extra, flat.values)
    params = layout.to_layout(traverse_util.unflatten_dict(
        {k: jnp.asarray(v, param_dtype) for k, v in flat.items() if k in shapes}, sep="/"), config.scan_layers)
    model = model_class(config, params=params, dtype=dtype, param_dtype=param_dtype,
                        generation_config=generation_config)
    model.load_report = report
    return model


def export_part(config: EncoderDecoderConfig, flat_params: Mapping[str, np.ndarray], part: str,
                save_directory) -> paths.AnyPath:
    """``EncoderDecoderModel.export_part_pytorch``: the unrolled ``flat_params`` of ``part`` under the names of
    its standalone checkpoint (``stack_rules``), with the part's config, into ``save_directory``."""
    require(part in ("encoder", "decoder"), f"part must be 'encoder' or 'decoder', got {part!r}")
    part_config = getattr(config, part)
    spec = config.encoder_spec if part == "encoder" else config.decoder_spec
    rules = names.stack_rules(part_config.model_type, spec, part, "", part,
                              tied=part == "decoder" and config.tie_encoder_decoder)
    with storage.atomic_folder(save_directory) as staging:
        write_safetensors(params_to_state_dict(rules, flat_params), staging / "model.safetensors",
                          metadata={"format": "pt"})
        storage.write_json(part_config.to_dict(), staging / CONFIG_NAME)
    return paths.as_path(save_directory)


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
    """``config`` with the fields of ``encoder_<field>`` / ``decoder_<field>`` keyword arguments replaced; an
    unknown field is a ConfigError listing the close matches, a value of the wrong type one naming the field."""
    return config.replace(**overrides)


# Floating dtypes the weights may be loaded in; torch's other names for them.
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64")
TORCH_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64"}


def _float_dtype(value: Any, argument: str) -> jnp.dtype:
    """``value`` (a JAX / numpy / torch dtype or its name) as a JAX floating dtype; ConfigError naming
    ``argument`` otherwise, or for float64 without ``jax_enable_x64`` (JAX would store float32)."""
    if type(value).__module__ == "torch":  # torch.bfloat16 prints as "torch.bfloat16"
        spelled = str(value).removeprefix("torch.")
    else:  # a name as transformers takes it ("bfloat16", "half"), or a JAX / numpy dtype
        spelled = TORCH_DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
    try:
        dtype = jnp.dtype(spelled)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.name not in WEIGHT_DTYPES:
        raise ConfigError(f"{argument}={value!r} is not a floating-point dtype for the weights; use jnp.float32, "
                          "jnp.bfloat16 or jnp.float16 (torch dtypes and their names are accepted too), or 'auto'")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError(f"{argument}={value!r}: float64 weights need jax.config.update('jax_enable_x64', True) "
                          "first (without it JAX stores float32)")
    return dtype


def _requested_weights_dtype(param_dtype: Any, torch_dtype: Any) -> jnp.dtype | str:
    """The weights' dtype from ``param_dtype`` or transformers' ``torch_dtype`` (float32 when neither is given), or
    "auto" (the checkpoint's, resolved once it is read)."""
    if param_dtype is not None and torch_dtype is not None:
        raise ConfigError(f"pass torch_dtype ({torch_dtype!r}) or param_dtype ({param_dtype!r}), not both: both set "
                          "the dtype of the loaded weights")
    argument, value = ("torch_dtype", torch_dtype) if torch_dtype is not None else ("param_dtype", param_dtype)
    if value is None:
        return jnp.dtype(jnp.float32)
    if isinstance(value, str) and value == "auto":
        return "auto"
    return _float_dtype(value, argument)


def _checkpoint_dtype(config_extra: Mapping[str, Any], weights: Callable[[], Iterable[Any]]) -> jnp.dtype:
    """``torch_dtype="auto"`` as transformers resolves it: the ``dtype`` (transformers 5) or ``torch_dtype``
    (transformers 4) of config.json, else the dtype of the first floating-point tensor of ``weights()``."""
    recorded = config_extra.get("dtype") or config_extra.get("torch_dtype")
    if recorded is not None:
        return _float_dtype(recorded, "the dtype in the checkpoint's config.json")
    for array in weights():
        if jnp.issubdtype(array.dtype, jnp.floating):
            return _float_dtype(array.dtype, "the dtype of the checkpoint's weights")
    return jnp.dtype(jnp.float32)


def _init_unrolled(model, paths: list[str], seed: int) -> dict[str, jax.Array]:
    """``model.init_params(seed)``'s values of ``paths`` only (flat ``/``-joined paths of the unrolled layout): the
    program computes no other parameter (XLA drops what is not returned), so that a warm start pays for the few
    parameters its checkpoints lack, not for a whole random model."""
    return _init_paths(model.module, tuple(paths), jax.random.key(seed)) if paths else {}


@partial(jax.jit, static_argnums=(0, 1))
def _init_paths(module, paths: tuple[str, ...], rng: jax.Array) -> dict[str, jax.Array]:
    """``_init_unrolled``'s program, static in the module and the paths: one compilation per (config, paths)."""
    flat = traverse_util.flatten_dict(layout.to_layout(fresh_params(module, rng), scanned=False), sep="/")
    return {path: flat[path] for path in paths}


def _agreed_dtype(dtypes: Mapping[str, jnp.dtype]) -> jnp.dtype:
    """The one dtype of ``{"encoder": ..., "decoder": ...}``; a ConfigError when the checkpoints differ."""
    if len(set(dtypes.values())) > 1:
        found = ", ".join(f"{role} {dtype.name}" for role, dtype in dtypes.items())
        raise ConfigError(f"torch_dtype='auto': the checkpoints differ ({found}); pass the dtype to load them in, "
                          "e.g. torch_dtype=jnp.float32")
    return next(iter(dtypes.values()))


def _is_own_tree(tree: Mapping) -> bool:
    """Our msgpack trees name layers ``layers_{i}``; transformers' Flax trees use ``layer/{i}`` or ``h/{i}``."""
    return any("/layers_0/" in k for k in traverse_util.flatten_dict(tree, sep="/"))


def _compare_tree(flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> LoadReport:
    report = LoadReport(missing=sorted(set(shapes) - set(flat)), unexpected=sorted(set(flat) - set(shapes)))
    report.mismatched = [f"{k} {tuple(np.shape(v))} vs expected {shapes[k]}" for k, v in flat.items()
                         if k in shapes and tuple(np.shape(v)) != tuple(shapes[k])]
    return report
