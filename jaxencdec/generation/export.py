"""``generate`` as a saved ``jax.export`` artifact that serves without the model code.

``export_generate`` traces ``make_generate_fn`` once with a symbolic batch size and source length, lowers it to
StableHLO for several platforms at once (``cpu``, ``cuda``, ``tpu`` by default, none of which needs to be
present), and with ``folder`` writes it beside a ``save_pretrained`` copy of the model, so that the folder is also
a normal model folder. ``jaxencdec.generation.serving.load_generate`` reads it back in a process that imports
jax, numpy and flax's msgpack reader only (that module is kept apart from this one, which imports the model).

    export_generate(model, num_beams=4, max_new_tokens=64, folder="served")   # once, where jaxencdec is
    generate = load_generate("served")                                       # in the serving process
    ids = generate(input_ids, attention_mask)                                # int32 [batch, 65]
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxencdec import storage
from jaxencdec.checkpoint.weights import find_weights
from jaxencdec.generation.api import check_against_model, make_generate_fn, merge_config, model_defaults
from jaxencdec.generation.config import GenerationConfig, GenerationConfigError
from jaxencdec.generation.serving import (EXPORTED_NAME, FORMAT, FORMAT_VERSION, KEY_IMPL, KEY_SHAPE,
                                          MANIFEST_NAME)
from jaxencdec.version import __version__

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUT_NAMES = ("input_ids", "attention_mask", "prng_key")


def export_generate(model, generation_config: GenerationConfig | None = None, *,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS, max_source_length: int | None = None,
                    folder: str | os.PathLike | None = None, **kwargs) -> jax.export.Exported:
    """The exported ``(params, input_ids, attention_mask, prng_key_data) -> sequences`` of ``make_generate_fn``.

    Args:
      model: an ``EncoderDecoderModel``; its config, compute dtype and parameter shapes are baked in (the
        parameter values are an input).
      generation_config, **kwargs: the decoding mode, merged with ``model.generation_config`` as ``generate``
        merges them (``num_beams=4, max_new_tokens=64``, ``do_sample=True``...). Every field is static: one
        artifact per mode. ``return_dict_in_generate`` is not supported (the artifact returns sequences).
      platforms: the platforms to lower for, any of ``cpu``, ``cuda``, ``rocm``, ``tpu``.
      max_source_length: the longest source the artifact accepts (default: the positions the encoder embeds).
      folder: where to write the artifact (see the module docstring); replaced as a whole.
    Returns:
      the ``jax.export.Exported``. Its arguments: ``params`` (the tree of ``model.params``, same shapes and
      dtypes), ``input_ids`` and ``attention_mask`` int32 ``[batch, source_length]``, and the raw data of a
      threefry PRNG key, uint32 ``[2]`` (``jax.random.key_data(jax.random.key(seed))``; unused unless sampling).
      Its result: int32 ``[batch * num_return_sequences, max_length]``, the ids ``make_generate_fn`` gives.

    Symbolic (one artifact serves every value; each new value still compiles once where it is loaded): ``batch``
    (>= 1) and ``source_length`` (1 .. ``max_source_length``; at least ``encoder_no_repeat_ngram_size`` when that
    is set, since the search skips the n-gram ban for shorter sources at trace time). Static: everything else,
    as in ``make_generate_fn`` (the generation config, ``max_length``, the beams, the dtypes). The program runs on
    one device; its parameters are not sharded.
    """
    config = merge_config(model_defaults(model), generation_config, kwargs).resolve()
    check_against_model(config, model.config)
    if config.return_dict_in_generate:
        raise GenerationConfigError("export_generate returns sequences only: set return_dict_in_generate=False")
    platforms = _checked_platforms(platforms)
    limits = _source_limits(model, config, max_source_length)
    generate_fn = make_generate_fn(model.config, config, dtype=model.module.dtype,
                                   param_dtype=model.module.param_dtype)

    def generate_from_key_data(params, input_ids, attention_mask, key_data):
        key = jax.random.wrap_key_data(key_data, impl=KEY_IMPL) if config.do_sample else None
        return generate_fn(params, input_ids, attention_mask, key)

    exported = jax.export.export(jax.jit(generate_from_key_data), platforms=platforms)(
        *_argument_specs(model.params, *limits))
    if folder is not None:
        _write_artifact(folder, model, exported, _manifest(model, config, exported, *limits))
    return exported


def _checked_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """``platforms`` as a tuple, each one a platform ``jax.export`` lowers for, without repeats."""
    names = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    unknown = [p for p in names if p not in KNOWN_PLATFORMS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"platforms must name each of {', '.join(KNOWN_PLATFORMS)} at most once, got "
                         f"{list(names)} (GPUs are 'cuda' or 'rocm')")
    return names


def _source_limits(model, config: GenerationConfig, max_source_length: int | None) -> tuple[int, int]:
    """``(min_source_length, max_source_length)`` the artifact accepts; raises ValueError naming the argument."""
    embeds = model.config.encoder_spec.max_length
    longest = embeds if max_source_length is None else max_source_length
    shortest = max(1, config.encoder_no_repeat_ngram_size)
    if not isinstance(longest, int) or not shortest <= longest <= embeds:
        raise ValueError(f"max_source_length must be an integer from {shortest} to {embeds} (the positions the "
                         f"encoder embeds), got {max_source_length!r}")
    return shortest, longest


def _argument_specs(params, min_source_length: int, max_source_length: int) -> tuple:
    """The exported function's argument specs: params as they are, ``[batch, source_length]`` ids and mask."""
    constraints = [f"source_length <= {max_source_length}"]
    if min_source_length > 1:
        constraints.append(f"source_length >= {min_source_length}")
    batch, source_length = jax.export.symbolic_shape("batch, source_length", constraints=constraints)
    tokens = jax.ShapeDtypeStruct((batch, source_length), jnp.int32)
    return (jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params), tokens, tokens,
            jax.ShapeDtypeStruct(KEY_SHAPE, jnp.uint32))


def _aval_json(aval, **fields) -> dict[str, Any]:
    """``{**fields, "shape": [...], "dtype": ...}``, a symbolic dimension as its expression (``"4*batch"``)."""
    return {**fields, "shape": [d if isinstance(d, int) else str(d) for d in aval.shape], "dtype": str(aval.dtype)}


def _manifest(model, config: GenerationConfig, exported: jax.export.Exported, min_source_length: int,
              max_source_length: int) -> dict[str, Any]:
    """What a server needs to know without deserializing: files, platforms, inputs, limits, mode, versions."""
    inputs = zip(INPUT_NAMES, exported.in_avals[-len(INPUT_NAMES):])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_file": EXPORTED_NAME,
        "platforms": list(exported.platforms),
        "inputs": [_aval_json(aval, name=name) for name, aval in inputs],  # after the params, in order
        "output": _aval_json(exported.out_avals[0]),
        "min_source_length": min_source_length,
        "max_source_length": max_source_length,
        "source_vocab_size": model.config.encoder_spec.vocab_size,
        "needs_prng_key": config.do_sample,
        "prng_key_impl": KEY_IMPL,
        "dtype": jnp.dtype(model.module.dtype).name,
        "param_dtype": jnp.dtype(model.module.param_dtype).name,
        "generation_config": config.to_dict(),
        "calling_convention_version": exported.calling_convention_version,
        "jaxencdec_version": __version__,
        "jax_version": jax.__version__,
    }


def _write_artifact(folder: str | os.PathLike, model, exported: jax.export.Exported, manifest: dict) -> None:
    """``model.save_pretrained`` files + the serialized program + the manifest (naming the weights file that
    ``save_pretrained`` wrote), replacing ``folder`` as a whole."""
    with storage.atomic_folder(folder) as staging:
        model.save_pretrained(staging)
        _, weights = find_weights(staging)
        (staging / EXPORTED_NAME).write_bytes(exported.serialize())
        storage.write_json({**manifest, "weights_file": weights[0].name}, staging / MANIFEST_NAME)
