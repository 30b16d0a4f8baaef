"""Serving an exported generate function without the model code: ``load_generate(folder)``.

A folder written by ``jaxencdec.generation.export.export_generate(..., folder=...)`` (or ``jaxencdec export``)
is a normal model folder (``config.json``, ``generation_config.json``, ``flax_model.msgpack``) plus
``generate.jax_export``, the serialized ``jax.export.Exported`` of the whole search (encoder, cross-attention
keys/values, decoding loop and logits processors), and ``generate_export.json``, its manifest. Loading it needs
jax, numpy and flax's msgpack reader only: this module imports none of jaxencdec's model, layer or search code,
so a serving process neither builds a module nor traces the search (it still compiles the loaded program once
per input shape, as any jitted function).

    from jaxencdec.generation.serving import load_generate
    generate = load_generate("served")
    ids = generate(input_ids, attention_mask)  # and prng_key=jax.random.key(0) when the artifact samples
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxencdec import paths, storage
from jaxencdec.checkpoint.formats import read_msgpack
from jaxencdec.inputs import mask_or_ones, validate_token_ids

EXPORTED_NAME = "generate.jax_export"
MANIFEST_NAME = "generate_export.json"
FORMAT = "jaxencdec-generate"
FORMAT_VERSION = 1
# The exported function takes the PRNG key as its raw data, so that its signature is plain arrays.
KEY_IMPL = "threefry2x32"
KEY_SHAPE = (2,)


class ServedGenerate:
    """``fn(input_ids, attention_mask=None, prng_key=None) -> sequences`` on a loaded export; see ``load_generate``.

    Attributes:
      exported: the deserialized ``jax.export.Exported`` (``.platforms``, ``.in_avals``, ``.out_avals``).
      params: the parameter tree read from the folder, on the default device.
      manifest: the folder's ``generate_export.json`` as a dict (shapes, limits, the generation config, versions).
    """

    def __init__(self, exported: jax.export.Exported, params: Any, manifest: dict[str, Any]):
        self.exported = exported
        self.params = params
        self.manifest = manifest
        self._call = jax.jit(exported.call)  # one compilation per (batch, source length), as make_generate_fn

    @property
    def platforms(self) -> tuple[str, ...]:
        return tuple(self.exported.platforms)

    def __call__(self, input_ids, attention_mask=None, prng_key=None) -> jax.Array:
        """Generates for ``input_ids [batch, src_len]`` (any integer dtype; ``batch >= 1``; ``src_len`` between
        the manifest's ``min_source_length`` and ``max_source_length``) and ``attention_mask`` (same shape, 0/1;
        None: all ones). ``prng_key``: a ``jax.random.key`` or raw ``uint32[2]`` key data, needed when the
        artifact samples (``manifest["needs_prng_key"]``), ignored otherwise.

        Returns int32 ``[batch * num_return_sequences, max_length]``: the same ids as ``make_generate_fn`` with the
        exported generation config on the same inputs and key.
        """
        self._check_source_length(input_ids)
        ids = validate_token_ids(input_ids, self.manifest["source_vocab_size"], self.manifest["max_source_length"],
                                 "input_ids")
        mask = mask_or_ones(attention_mask, ids, "attention_mask")
        return self._call(self.params, ids, mask, self._key_data(prng_key))

    def _check_source_length(self, input_ids) -> None:
        """ValueError unless a ``[batch, src_len]`` input has ``src_len`` inside the symbolic length's bounds."""
        shortest, longest = self.manifest["min_source_length"], self.manifest["max_source_length"]
        shape = np.shape(input_ids)
        if len(shape) == 2 and not shortest <= shape[1] <= longest:
            floor = f" and encoder_no_repeat_ngram_size={shortest}" if shortest > 1 else ""
            raise ValueError(f"input_ids has {shape[1]} column(s); this artifact takes {shortest} to {longest} (its "
                             f"max_source_length{floor}): truncate the inputs, or pad them with masked pad tokens")

    def _key_data(self, prng_key) -> np.ndarray:
        """uint32 ``[2]``: the raw data of ``prng_key`` (zeros when the artifact does not sample)."""
        if not self.manifest["needs_prng_key"]:
            return np.zeros(KEY_SHAPE, np.uint32)
        if prng_key is None:
            raise ValueError("this artifact samples (do_sample=True): pass prng_key, e.g. jax.random.key(0)")
        if jax.dtypes.issubdtype(getattr(prng_key, "dtype", None), jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(prng_key))
            if impl != KEY_IMPL:
                raise ValueError(f"prng_key is a {impl} key; the artifact takes {KEY_IMPL} keys: "
                                 f"jax.random.key(seed, impl='{KEY_IMPL}')")
            prng_key = jax.random.key_data(prng_key)
        data = np.asarray(prng_key)
        if data.shape != KEY_SHAPE or data.dtype != np.uint32:
            raise ValueError(f"prng_key must be a jax.random.key or its raw uint32{list(KEY_SHAPE)} data, got "
                             f"{data.dtype}{list(data.shape)}")
        return data


def load_generate(folder: str | os.PathLike) -> ServedGenerate:
    """The generate function saved in ``folder`` (a local path or a bucket URL such as ``gs://bucket/served``) by
    ``export_generate(..., folder=...)``, ready to call.

    Reads the manifest, deserializes the exported program, checks that it was lowered for this process's
    platform, and reads the parameters from the same folder (checked against the program's inputs) onto the
    default device. Raises ``CheckpointError`` / ``ValueError`` naming the file and the fix.
    """
    folder = paths.as_path(folder)
    manifest = _read_manifest(folder)
    exported = _deserialize(folder / manifest["exported_file"], manifest)
    _check_platform(exported, folder)
    params = _read_params(folder / manifest["weights_file"], exported)
    return ServedGenerate(exported, jax.device_put(params), manifest)


def _read_manifest(folder: paths.AnyPath) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not paths.is_file(path):
        raise FileNotFoundError(f"{path}: no exported generate function in {folder}; write one with "
                                "jaxencdec.generation.export.export_generate(model, ..., folder=...) or "
                                "`jaxencdec export MODEL OUT`")
    manifest = storage.read_json(path)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT} manifest of version {FORMAT_VERSION} (got format "
                         f"{manifest.get('format')!r}, version {manifest.get('format_version')!r}); export again "
                         "with this jaxencdec")
    return manifest


def _deserialize(path: paths.AnyPath, manifest: dict[str, Any]) -> jax.export.Exported:
    try:
        data = paths.read_bytes(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: the exported program named in {MANIFEST_NAME} is missing") from error
    try:
        return jax.export.deserialize(bytearray(data))
    except ImportError:  # flatbuffers, which jax needs to read the format
        raise
    except Exception as error:
        raise ValueError(f"{path}: cannot be read by jax {jax.__version__} (written by jax "
                         f"{manifest.get('jax_version')}; {type(error).__name__}: {error}); export again with this "
                         "jax, or serve with the jax that wrote it") from error


def _check_platform(exported: jax.export.Exported, folder: paths.AnyPath) -> None:
    platform = jax.export.default_export_platform()
    if platform not in exported.platforms:
        raise ValueError(f"{folder}: exported for {', '.join(exported.platforms)}, but this process runs on "
                         f"{platform}; export again with platforms including {platform!r}")


def _read_params(path: paths.AnyPath, exported: jax.export.Exported) -> Any:
    """The parameter tree in ``path``, checked against the exported program's first argument."""
    params = read_msgpack(path)
    expected_tree = exported.in_tree.children()[0].children()[0]  # in_tree: ((params, ids, mask, key), {})
    if jax.tree.structure(params) != expected_tree:
        raise ValueError(f"{path}: its parameter tree is not the one the exported program was traced with; the "
                         "folder's weights were replaced after the export: export again")
    for (key_path, leaf), aval in zip(jax.tree_util.tree_flatten_with_path(params)[0], exported.in_avals):
        if (leaf.shape, leaf.dtype) != (aval.shape, aval.dtype):
            raise ValueError(f"{path}: parameter {jax.tree_util.keystr(key_path)} is {leaf.dtype}{list(leaf.shape)}, "
                             f"the exported program takes {aval.dtype}{list(aval.shape)}: export again")
    return params
