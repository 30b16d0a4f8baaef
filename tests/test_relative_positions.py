"""Relative position embeddings (``position_embedding_type="relative_key"`` / ``"relative_key_query"``) and a
tied encoder-decoder, against transformers 4.57.3, which transformers 5 no longer matches (it removed both).

The references are committed in ``tests/references/transformers4/``: ``tests/transformers4_references.py`` says
what they were computed on, and ``python tools/make_transformers4_references.py`` computes them again with
transformers 4. transformers 4 built small BERT and RoBERTa pairs with relative positions in the encoder and in
the decoder, saved them, and recorded their logits, attentions, gradients and generated ids; we load each
checkpoint and compare every path: the forward pass, its gradients, ``encode`` / ``decode`` with a cache, greedy
and beam generation on a padded batch. A tied relative bert2bert saved by transformers 4 is trained here as it was
trained there, and its export is checked against what transformers 4 recorded loading a tied model.

transformers 4.57's teacher-forced forward with its default ``use_cache=True`` places every decoder query at the
last position (it only agrees at ``q_len == 1``, i.e. in generation); its references here use ``use_cache=False``,
where each query sits at its own position, as in its generation and ours (``test_cached_decoding_matches``
shows the difference).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import transformers4_references as references
from hf_reference import PAD
from jaxencdec import EncoderDecoderModel
from jaxencdec.config import BertConfig, EncoderDecoderConfig
from jaxencdec.errors import ConfigError
from jaxencdec.train import step as st
from transformers4_references import (BEAMS, BERT_PAIRS, FOLDER, FORWARD, GENERATE, GENERATION, KEY_DECODERS,
                                      KEY_QUERY_DECODERS, LEARNING_RATE, PAIRS, TRAIN, TRAIN_STEPS, decoder_inputs)


@pytest.fixture(scope="module")
def reference():
    """(``metadata.json``, the recorded outputs by model then output), computed with this module's settings."""
    return references.load()


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, reference):
    """(name, our model loaded from transformers 4's checkpoint, that model's recorded outputs)."""
    name = request.param
    return name, EncoderDecoderModel.from_pretrained(FOLDER / name), reference[1][name]


def test_checkpoint_loads_every_tensor_and_the_config_round_trips(pair, tmp_path):
    name, ours, _ = pair
    _, encoder_type, decoder_type, _ = PAIRS[name]
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    paths = set(traverse_util.flatten_dict(ours.params, sep="/"))
    for stack in ("encoder", "decoder"):
        assert f"{stack}/layers_1/self_attention/distance/embedding" in paths
        assert f"{stack}/embeddings/position/embedding" in paths  # transformers keeps (and saves) it, unused
    assert not any("cross_attention/distance" in path for path in paths)
    kinds = {"relative_key": "key", "relative_key_query": "key_query"}
    assert (ours.config.encoder_spec.relative_attention, ours.config.decoder_spec.relative_attention) == \
        (kinds[encoder_type], kinds[decoder_type])
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["encoder"]["position_embedding_type"], saved["decoder"]["position_embedding_type"]) == \
        (encoder_type, decoder_type)
    assert EncoderDecoderModel.from_pretrained(tmp_path).config == ours.config


def test_logits_loss_and_attentions_match(pair):
    _, ours, expected = pair
    ids, mask, labels = FORWARD
    out = ours(ids, mask, labels=labels, output_attentions=True)
    np.testing.assert_allclose(np.asarray(out.logits), expected["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(out.loss), float(expected["loss"]), rtol=1e-5)
    for field in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        np.testing.assert_allclose(np.stack(getattr(out, field)), expected[field], atol=1e-5, rtol=0, err_msg=field)


@pytest.mark.parametrize("pair", BERT_PAIRS, indirect=True)
def test_gradients_match(pair):
    """The train step's loss differentiates as PyTorch does, the distance tables included."""
    _, ours, expected = pair
    ids, mask, labels = FORWARD
    decoder_ids = decoder_inputs(labels)
    loss_fn = st.make_loss_fn(ours.module, 0.0, mesh=None, deterministic=True)
    model_batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
                   "decoder_attention_mask": np.ones_like(decoder_ids), "labels": labels}

    def mean_loss(params):
        total, count = loss_fn(params, model_batch, None)
        return total / count

    grads = EncoderDecoderModel(ours.config, jax.jit(jax.grad(mean_loss))(ours.params)).pytorch_state_dict()
    hf_grads = {key.removeprefix("grad|"): value for key, value in expected.items() if key.startswith("grad|")}
    assert sum("distance_embedding" in key for key in hf_grads) == 4  # two layers, encoder and decoder
    for key, grad in grads.items():  # no PyTorch gradient where the loss does not reach (pooler, unused positions)
        np.testing.assert_allclose(grad, hf_grads.get(key, np.zeros_like(grad)), atol=1e-5, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("pair", KEY_QUERY_DECODERS, indirect=True)
def test_cached_decoding_matches(pair):
    """``encode``, then ``decode`` with a cache: three tokens in one call, then one at a time (the decoder mask
    hides pads, as transformers' does when it builds the decoder inputs from labels)."""
    _, ours, expected = pair
    ids, mask, labels = FORWARD
    decoder_ids = decoder_inputs(labels)
    encoded = ours.encode(ids, mask)
    cache = ours.init_cache(len(ids), decoder_ids.shape[1], encoded)
    logits = []
    for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, decoder_ids.shape[1])]:
        out = ours.decode(decoder_ids[:, start:stop], encoded, mask, decoder_ids != PAD, past_key_values=cache)
        logits.append(np.asarray(out.logits))
        cache = out.past_key_values
    logits = np.concatenate(logits, axis=1)
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)
    # transformers 4.57's forward with use_cache=True puts every query at the last position: only the first
    # agrees (in every layer it sees one key, its own, whatever its position).
    with_cache = expected["logits_use_cache"]
    np.testing.assert_allclose(logits[:, 0], with_cache[:, 0], atol=1e-4, rtol=0)
    assert np.abs(logits[:, 1:] - with_cache[:, 1:]).max(axis=-1).min() > 1e-3


@pytest.mark.parametrize("pair", KEY_DECODERS, indirect=True)
def test_greedy_generation_matches(pair):
    _, ours, expected = pair
    got = np.asarray(ours.generate(*GENERATION, **GENERATE))
    assert expected["greedy"].shape[1] > 4  # not ended at once
    np.testing.assert_array_equal(got, expected["greedy"])


def test_beam_search_matches(pair):
    """Beam search on a padded batch: the beams of an input share one cache, one slot per beam."""
    _, ours, expected = pair
    got = ours.generate(*GENERATION, **GENERATE, **BEAMS, return_dict_in_generate=True, output_scores=True)
    assert expected["beams"].shape[1] > 4
    np.testing.assert_array_equal(np.asarray(got.sequences), expected["beams"])
    np.testing.assert_allclose(np.asarray(got.sequences_scores), expected["beam_scores"], atol=1e-4, rtol=0)


def _config_entries(config: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """``config.json``'s entries by path, the encoder's and decoder's own entries included."""
    entries = {}
    for key, value in config.items():
        if key in ("encoder", "decoder"):
            entries.update(_config_entries(value, prefix + (key,)))
        else:
            entries[prefix + (key,)] = value
    return entries


def _export_as_transformers_4_reads_it(model: EncoderDecoderModel, folder: Path, tied: dict) -> dict[str, np.ndarray]:
    """Exports ``model`` and returns its tensors, after checking the folder against ``tied``, what transformers 4
    recorded loading a folder that holds its own save of the tied model plus each shared tensor under its encoder
    name too (tied, nothing missing or unexpected): the export holds exactly those names; the names that share one
    tensor there hold one value here (whichever transformers 4 reads, it gets the same); ``config.json`` has each
    entry that transformers 4 writes for the model, and no entry with another value than the one transformers 4
    holds (so it builds the same config, tied)."""
    model.export_pytorch(folder)
    tensors = load_file(folder / "model.safetensors")
    assert sorted(tensors) == tied["keys"]
    for names in tied["shared"]:
        values = [tensors[name] for name in names if name in tensors]
        for value in values[1:]:
            np.testing.assert_array_equal(value, values[0], err_msg=str(names))
    ours = _config_entries(json.loads((folder / "config.json").read_text()))
    held = _config_entries(tied["config"])
    written = _config_entries(json.loads((FOLDER / "tied" / "config.json").read_text()))
    assert {path: held.get(path, "(absent)") for path in ours} == ours
    assert {path: ours.get(path, "(absent)") for path in written} == written
    return tensors


def test_tied_bert2bert_trains_and_reloads_tied_in_transformers_4(reference, tmp_path):
    """A tied relative bert2bert saved by transformers 4 loads with its shared tensors stored once and gives its
    logits; three SGD steps here equal transformers 4's (each shared tensor, distance tables included, gets the sum
    of both uses' gradients); saved and reloaded it is unchanged.

    That transformers 4 loads our export tied, with our logits and beams, is checked against the reference
    (``_export_as_transformers_4_reads_it``): our export has exactly the tensor names of a folder transformers 4
    loaded tied, with nothing missing or unexpected, one value per shared tensor, and a config transformers 4 reads
    as its own. Exported as loaded, the model gives back transformers 4's saved tensors bit for bit (a tensor put
    under another name, or transposed, shows here, where a round trip through our own loader would hide it).
    Trained, the export passes the same checks and reloads here with our trained logits (those transformers 4
    computed after the same training), and beam search on it gives the beams transformers 4 generated from its
    reload of its trained model.
    """
    metadata, outputs = reference
    expected, tied = outputs["tied"], metadata["tied"]
    saved = FOLDER / "tied"
    ours = EncoderDecoderModel.from_pretrained(saved)
    assert ours.config.tie_encoder_decoder
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    paths = set(traverse_util.flatten_dict(ours.params, sep="/"))
    assert "encoder/layers_0/self_attention/distance/embedding" in paths
    assert not any(p.startswith(("decoder/embeddings", "decoder/layers_0/self_attention/")) for p in paths)
    ids, mask, labels = FORWARD
    np.testing.assert_allclose(np.asarray(ours(ids, mask, labels=labels).logits), expected["logits"], atol=1e-4,
                               rtol=0)
    exported = _export_as_transformers_4_reads_it(ours, tmp_path / "export", tied)
    for name, tensor in load_file(saved / "model.safetensors").items():
        assert exported[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)

    train_ids, train_mask, train_labels = TRAIN
    train_decoder_ids = decoder_inputs(train_labels)
    train_batch = {"input_ids": train_ids, "attention_mask": train_mask, "decoder_input_ids": train_decoder_ids,
                   "decoder_attention_mask": np.ones_like(train_decoder_ids), "labels": train_labels}
    optimizer = optax.sgd(LEARNING_RATE)
    train_step = jax.jit(st.make_train_step(ours.module, optimizer, optax.constant_schedule(LEARNING_RATE),
                                            dropout=False, mesh=None))
    state = st.TrainState(step=jnp.zeros((), jnp.int32), params=ours.params, opt_state=optimizer.init(ours.params),
                          rng=jax.random.PRNGKey(0))
    losses = []
    for _ in range(TRAIN_STEPS):
        state, metrics = train_step(state, train_batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, expected["train_losses"], rtol=1e-5)
    assert losses[-1] < losses[0]
    ours.params = state.params
    trained = np.asarray(ours(ids, mask, labels=labels).logits)
    np.testing.assert_allclose(trained, expected["trained_logits"], atol=1e-4, rtol=0)

    ours.save_pretrained(tmp_path / "saved")
    reloaded = EncoderDecoderModel.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(np.asarray(reloaded(ids, mask, labels=labels).logits), trained)

    _export_as_transformers_4_reads_it(ours, tmp_path / "trained", tied)
    reloaded = EncoderDecoderModel.from_pretrained(tmp_path / "trained")
    assert reloaded.config.tie_encoder_decoder
    np.testing.assert_array_equal(np.asarray(reloaded(ids, mask, labels=labels).logits), trained)
    np.testing.assert_array_equal(np.asarray(reloaded.generate(*GENERATION, **GENERATE, **BEAMS)),
                                  expected["trained_beams"])


def test_tying_stacks_with_different_position_schemes_is_a_config_error():
    """transformers 4 would tie all but the distance tables; a half-tied pair is refused here instead."""
    parts = [BertConfig(position_embedding_type="relative_key"), BertConfig()]
    with pytest.raises(ConfigError, match="position schemes must agree; encoder vs decoder: relative_attention key vs "
                                          "None"):
        EncoderDecoderConfig.from_encoder_decoder_configs(*parts, tie_encoder_decoder=True)
