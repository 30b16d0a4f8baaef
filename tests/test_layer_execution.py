"""Scanned layers and rematerialization change how the layers run, never what they compute: against
transformers' PyTorch on Hugging Face folders loaded into the scanned layout, against the unrolled layout
(outputs, loss, gradients, cached decoding, every search, recorded attentions), and in training (a checkpoint
written unrolled resumes scanned with remat, and ends where the unrolled run ends)."""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

import testing
from hf_reference import COMPUTED_PAIRS, PAIRS, VOCAB, batch, by_pair
from jaxencdec import EncoderDecoderModel
from jaxencdec.config import BertConfig, EncoderDecoderConfig
from jaxencdec.models import layout
from jaxencdec.models.encoder_decoder import shift_tokens_right
from jaxencdec.train import step as steps
from test_models_equivalence import assert_same_outputs

# (scan_layers, remat) ways of running the layers, each compared with the plain unrolled one.
LAYOUTS = {"scanned": (True, "none"), "remat": (False, "full"),
           "remat-dots": (False, "dots_with_no_batch_dims_saveable"), "scanned-remat": (True, "full")}


def _relative_and_tied_configs() -> dict[str, EncoderDecoderConfig]:
    """The layouts' other paths: relative position scores (a distance table per layer) and a tied pair (the
    decoder reads the encoder's layers), with fewer decoder than encoder layers."""
    bert = lambda **k: BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=37, max_position_embeddings=64),
                                     **k})
    make = lambda enc, dec, **k: EncoderDecoderConfig.from_encoder_decoder_configs(
        enc, dec, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, **k)
    return {"relative": make(bert(position_embedding_type="relative_key_query"),
                             bert(position_embedding_type="relative_key", num_hidden_layers=2)),
            "tied": make(bert(), bert(num_hidden_layers=2), tie_encoder_decoder=True)}


OWN = _relative_and_tied_configs()


@pytest.fixture(scope="module", params=by_pair(list(PAIRS)))
def saved_pair(request, hf_pair):
    """(name, transformers model, its saved folder) of each pair."""
    return request.param, *hf_pair(request.param)


def _as(model: EncoderDecoderModel, scan_layers: bool, remat: str) -> EncoderDecoderModel:
    """The same weights run another way."""
    config = model.config.replace(scan_layers=scan_layers, remat=remat)
    return EncoderDecoderModel(config, params=layout.to_layout(model.params, scan_layers),
                               generation_config=model.generation_config)


def _loss_and_grads(model: EncoderDecoderModel, seed: int, train: bool, compiler_options: dict | None = None):
    """The train step's loss and its gradients (unrolled layout, flat) on ``batch(seed)``, with dropout when
    ``train``, computed by one jitted program (compiled with the test run's flags unless ``compiler_options``
    says otherwise; compared to 1e-6 relative)."""
    ids, mask, labels = batch(seed)
    start, pad = model.config.decoder_start_token_id, model.config.pad_token_id
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "decoder_input_ids": np.asarray(shift_tokens_right(jnp.asarray(labels), pad, start)),
            "decoder_attention_mask": np.ones_like(labels)}
    loss_fn = steps.make_loss_fn(model.module, 0.0, None, deterministic=not train)
    mean = lambda p: (lambda total, count: total / count)(*loss_fn(p, data, jax.random.key(3)))
    loss, grads = jax.jit(jax.value_and_grad(mean), compiler_options=compiler_options)(model.params)
    flat = traverse_util.flatten_dict(layout.to_layout(grads, scanned=False), sep="/")
    return float(loss), {k: np.asarray(v) for k, v in flat.items()}


def assert_relatively_close(got: dict, expected: dict, rtol: float):
    """The gradient trees agree leaf by leaf in name and shape, and as vectors to ``rtol`` relative error."""
    assert got.keys() == expected.keys()
    diff = np.sqrt(sum(np.sum((got[k] - expected[k]) ** 2) for k in expected))
    norm = np.sqrt(sum(np.sum(expected[k] ** 2) for k in expected))
    assert norm > 0 and diff <= rtol * norm, (diff / norm, rtol)


# ---------------------------------------------------------------------- against transformers


def test_huggingface_folders_load_into_the_scanned_layout_and_match_transformers(saved_pair, tmp_path):
    name, hf, folder = saved_pair
    ours = EncoderDecoderModel.from_pretrained(folder, scan_layers=True, remat="full")
    # one subtree of every layer's parameters (ALBERT: of every group's), but ModernBERT's first, which has no
    # attention norm, unrolled beside it
    spec = ours.config.encoder_spec
    unrolled = spec.unscanned_layers
    assert sorted(k for k in ours.params["encoder"] if k.startswith("layers")) == ["layers"] + [
        f"layers_{i}" for i in range(unrolled)]
    scanned_leaves = jax.tree.leaves(ours.params["encoder"]["layers"])
    assert all(x.shape[0] == spec.num_layer_params - unrolled for x in scanned_leaves)
    assert_same_outputs(ours, hf)
    # and back out: the exported folder is an ordinary transformers checkpoint with the same outputs
    ours.export_pytorch(tmp_path / "exported")
    reloaded = transformers.EncoderDecoderModel.from_pretrained(tmp_path / "exported").eval()
    assert_same_outputs(ours, reloaded, seed=2)
    with torch.no_grad():
        for (k, v), (k2, v2) in zip(hf.state_dict().items(), reloaded.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k


def test_save_pretrained_writes_the_unrolled_layout_whatever_runs(saved_pair, tmp_path):
    _, _, folder = saved_pair
    scanned = EncoderDecoderModel.from_pretrained(folder, scan_layers=True)
    scanned.save_pretrained(tmp_path / "saved")
    assert "scan_layers" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    plain = EncoderDecoderModel.from_pretrained(tmp_path / "saved")
    assert not plain.config.scan_layers and "layers_0" in plain.params["decoder"]
    expected = traverse_util.flatten_dict(EncoderDecoderModel.from_pretrained(folder).params, sep="/")
    got = traverse_util.flatten_dict(plain.params, sep="/")
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


# ---------------------------------------------------------------------- against the unrolled layout


# Scanning stacks each architecture's layers its own way: every pair that computes its own way runs scanned. Remat
# wraps the one layer block that every architecture runs through in jax.checkpoint, whatever the pair: the remat
# ways run on one pair, and scanned on ALBERT's shared layers too (rematerialized inside their inner scan).
ONE_PAIR = "bert2bart"
WAYS = ([(name, "scanned") for name in COMPUTED_PAIRS] + [(ONE_PAIR, way) for way in LAYOUTS if way != "scanned"]
        + [("albert2roberta", "scanned-remat")])


@pytest.fixture(scope="module")
def losses_and_gradients(hf_pair):
    """``(pair, way) -> (loss, gradients)`` of a pair's folder run one way of ``LAYOUTS`` or unrolled
    (``plain-train`` with dropout, ``plain-eval`` without), each a jitted program as the train step is, computed
    once. Dropout draws per layer: the same draws unrolled with or without remat, other draws scanned (compared
    without)."""
    plain_model = functools.cache(lambda name: EncoderDecoderModel.from_pretrained(hf_pair(name)[1]))

    @functools.cache
    def get(name: str, way: str):
        plain = plain_model(name)
        if way.startswith("plain-"):
            return _loss_and_grads(plain, seed=4, train=way == "plain-train")
        scan, remat = LAYOUTS[way]
        return _loss_and_grads(_as(plain, scan, remat), seed=4, train=not scan)

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name, way", WAYS, ids=[f"{name}-{way}" for name, way in WAYS])
def test_loss_and_gradients_equal_the_unrolled_layers(losses_and_gradients, name, way):
    other_loss, other_grads = losses_and_gradients(name, way)
    loss, grads = losses_and_gradients(name, "plain-eval" if LAYOUTS[way][0] else "plain-train")
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    assert_relatively_close(other_grads, grads, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OWN))
def test_relative_and_tied_pairs_run_scanned_and_rematerialized_as_unrolled(name):
    plain = EncoderDecoderModel(OWN[name], seed=1)
    ids, mask, labels = batch(seed=6, src_len=9, tgt_len=7)
    expected = plain(ids, mask, labels=labels, output_attentions=True, output_hidden_states=True)
    loss, grads = _loss_and_grads(plain, seed=6, train=False)
    for scan_layers, remat in ((True, "none"), (True, "full"), (False, "full")):
        other = _as(plain, scan_layers, remat)
        got = other(ids, mask, labels=labels, output_attentions=True, output_hidden_states=True)
        assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(expected))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)
        other_loss, other_grads = _loss_and_grads(other, seed=6, train=False)
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
        assert_relatively_close(other_grads, grads, rtol=1e-6)
    if name == "tied":  # the scanned decoder holds only what it does not share
        scanned = _as(plain, True, "none")
        assert set(scanned.params["decoder"]["layers"]) == {"cross_attention", "cross_attention_norm"}


# Greedy search runs each pair's scanned decoder with its cache; the other searches differ from it in what they do
# with the logits, the same for every pair: they run on one pair.
SEARCHES = {"greedy": dict(num_beams=1), "beam": dict(num_beams=3), "sample": dict(do_sample=True, top_k=20),
            "beam-sample": dict(num_beams=2, do_sample=True)}
PAIR_SEARCHES = [(name, "greedy") for name in COMPUTED_PAIRS] + [(ONE_PAIR, mode) for mode in SEARCHES
                                                                 if mode != "greedy"]


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", PAIR_SEARCHES, ids=[f"{name}-{mode}" for name, mode in PAIR_SEARCHES])
def test_every_search_generates_the_same_ids_scanned(hf_pair, name, mode):
    plain = EncoderDecoderModel.from_pretrained(hf_pair(name)[1])
    scanned = _as(plain, True, "full")
    ids, mask, _ = batch(seed=7)
    key = jax.random.key(5)
    expected = np.asarray(plain.generate(ids, mask, prng_key=key, max_new_tokens=8, **SEARCHES[mode]))
    got = scanned.generate(ids, mask, prng_key=key, max_new_tokens=8, **SEARCHES[mode])
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OWN))
def test_scanned_generation_records_and_cached_decoding_equal_unrolled(name):
    plain = EncoderDecoderModel(OWN[name], seed=2)
    scanned = _as(plain, True, "none")
    ids, mask, _ = batch(seed=8, src_len=9)
    records = dict(return_dict_in_generate=True, output_attentions=True, output_hidden_states=True,
                   num_beams=2, max_new_tokens=4)
    expected, got = plain.generate(ids, mask, **records), scanned.generate(ids, mask, **records)
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(expected.sequences))
    assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(expected))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)
    # encode / init_cache / decode step by step (transformers' cached-decoding surface)
    decoder_ids = np.random.default_rng(0).integers(4, VOCAB, (3, 4))
    outputs = []
    for model in (plain, scanned):
        encoded, cache = model.encode(ids, mask), model.init_cache(3, 6)
        first = model.decode(decoder_ids[:, :3], encoded, mask, past_key_values=cache)
        outputs.append(model.decode(decoder_ids[:, 3:], encoded, mask, past_key_values=first.past_key_values))
    assert outputs[1].past_key_values.max_length == 6 and int(outputs[1].past_key_values.index) == 4
    np.testing.assert_allclose(np.asarray(outputs[1].logits), np.asarray(outputs[0].logits), atol=2e-6, rtol=0)


# Encoders whose scanned layout has a shape of its own: ALBERT's groups of shared layers (an inner scan per group)
# and ModernBERT's first layer, unrolled beside the scanned rest.
OWN_SCAN_SHAPES = ["albert2roberta", "modernbert2gpt2"]


@pytest.mark.parametrize("name", OWN_SCAN_SHAPES)
def test_scanned_encoder_records_every_layer_as_unrolled(hf_pair, name):
    plain = EncoderDecoderModel.from_pretrained(hf_pair(name)[1])
    ids, mask, labels = batch(seed=10)
    expected = plain(ids, mask, labels=labels, output_attentions=True, output_hidden_states=True)
    assert len(expected.encoder_hidden_states) == plain.config.encoder_spec.num_layers + 1
    for remat in ("none", "full"):
        got = _as(plain, True, remat)(ids, mask, labels=labels, output_attentions=True, output_hidden_states=True)
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        # another fusion of the same float32 sums: outputs up to ~20 in size (float32's spacing there: 1.9e-6) come
        # out a few of their last bits apart (on an AVX-512 Xeon, 4.5e-6 for one logit): the README's 1e-5
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_gradient_checkpointing_enable_is_transformers_switch(hf_pair):
    model = EncoderDecoderModel.from_pretrained(hf_pair("bert2gpt2-proj")[1])  # a switch: one pair shows it
    # with dropout, rematerialized under XLA:CPU's loop emitters, this pair's gradients come out 1.7e-6 apart
    # (relative): compiled as a user's process compiles, they are equal
    exact = testing.DEFAULT_EMITTERS
    loss, grads = _loss_and_grads(model, seed=9, train=True, compiler_options=exact)
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.config.remat == "full"
    remat_loss, remat_grads = _loss_and_grads(model, seed=9, train=True, compiler_options=exact)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert_relatively_close(remat_grads, grads, rtol=1e-6)
    model.gradient_checkpointing_enable({"policy": "dots_saveable"})
    assert model.config.remat == "dots_saveable"
    with pytest.raises(ValueError, match="only 'policy'"):
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.gradient_checkpointing_disable()
    assert model.config.remat == "none" and not model.is_gradient_checkpointing


def test_unknown_remat_policy_names_the_choices():
    from jaxencdec.errors import ConfigError

    with pytest.raises(ConfigError, match="remat must be one of .*'full'"):
        OWN["tied"].replace(remat="selective")


# ---------------------------------------------------------------------- in training


@pytest.mark.slow
def test_a_checkpoint_written_unrolled_resumes_scanned_and_ends_where_the_unrolled_run_ends(tmp_path):
    from jaxencdec.train.config import RunConfig
    from jaxencdec.train.loop import Trainer

    def run(name, **model):
        config = testing.tiny_run_config(str(tmp_path / "shared"), train={"num_steps": 4, "dropout": False},
                                         checkpoint={"every": 2, "keep": 2})
        config["model"]["encoder_config"]["num_hidden_layers"] = 2
        config["model"].update(model)
        config["output_dir"] = str(tmp_path / name)
        lines = []
        return Trainer(RunConfig.from_dict(config), log=lines.append).run(), lines

    run("unrolled")
    # the same run stopped after its step-2 checkpoint
    shutil.copytree(tmp_path / "unrolled", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "resumed" / "final_model")
    result, lines = run("resumed", scan_layers=True, remat="full")
    assert result["resumed_from"] == 2
    assert any("holds unrolled layers: converted" in line for line in lines)
    expected = testing.final_params(str(tmp_path / "unrolled"))
    got = testing.final_params(str(tmp_path / "resumed"))
    assert got.keys() == expected.keys()  # exported unrolled, as every file is
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
