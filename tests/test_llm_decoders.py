"""Llama-family decoders (Llama, Qwen2, Gemma 3) warm-started from transformers causal-LM folders, each layer given a
cross-attention block whose output is gated by ``tanh(gate)``, the gate initialised to 0.

With the gates at 0 the pair's decoder is the LLM: its logits and its greedy and beam-search ids are those of
transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Gemma3ForCausalLM`` on the same weights, whatever
the encoder reads. Training opens the gates; the pair saves and loads exactly, and its LLM exports back to a folder
of the LLM's class.
"""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util

from hf_reference import EOS, PAD, SMALL, START, VOCAB, by_pair, randomize_
from jaxencdec import ConfigError, EncoderDecoderModel
from jaxencdec.models import layout

_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=PAD, bos_token_id=START, eos_token_id=EOS)

# name -> (small transformers config, causal-LM class)
LLMS = {
    # grouped-query attention (2 key/value heads for 4), heads 12 wide (not 32 / 4), biases everywhere
    "llama": (lambda: transformers.LlamaConfig(**_SIZES, num_key_value_heads=2, head_dim=12, attention_bias=True,
                                               mlp_bias=True), transformers.LlamaForCausalLM),
    # one key/value head, the LM head tied to the word table, another rotary base
    "llama-tied": (lambda: transformers.LlamaConfig(**_SIZES, num_key_value_heads=1, tie_word_embeddings=True,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                   transformers.LlamaForCausalLM),
    # biases on query, key and value only
    "qwen2": (lambda: transformers.Qwen2Config(**_SIZES, num_key_value_heads=2), transformers.Qwen2ForCausalLM),
    # Gemma's norms, scaled embeddings, query/key norms, GeGLU; layers 0 and 2 see the last 3 positions only, with
    # their own rotary base
    "gemma3": (lambda: transformers.Gemma3TextConfig(
        **{**_SIZES, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
        sliding_window=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
               transformers.Gemma3ForCausalLM),
}


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    randomize_(transformers.BertModel(SMALL["bert"]()), seed=1).save_pretrained(folder)
    return folder


# the fast subset (``-m "not slow"``) runs Llama and Gemma 3; the full suite every variant
@pytest.fixture(scope="module", params=by_pair(list(LLMS), fast=("llama", "gemma3")))
def llm(request, tmp_path_factory):
    """(name, transformers causal LM, its folder)."""
    make_config, model_class = LLMS[request.param]
    model = randomize_(model_class(make_config()), seed=2)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def warm_started(llm, encoder_folder, **kwargs) -> EncoderDecoderModel:
    return EncoderDecoderModel.from_encoder_decoder_pretrained(encoder_folder, llm[2], decoder_start_token_id=START,
                                                               pad_token_id=PAD, eos_token_id=EOS, **kwargs)


def sources(seed: int, batch: int = 2, length: int = 7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, (batch, length))
    mask = np.ones_like(ids)
    mask[0, length - 2:] = 0
    return ids, mask


def llm_logits(model, decoder_ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(decoder_ids)).logits.float().numpy()


def with_gates(params, value: float):
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {k: jnp.full_like(v, value) if k.endswith("cross_attention_gate") else v for k, v in flat.items()}, sep="/")


def gates(model) -> np.ndarray:
    flat = traverse_util.flatten_dict(model.unrolled_params(), sep="/")
    return np.array([float(v) for k, v in sorted(flat.items()) if k.endswith("cross_attention_gate")])


def test_warm_start_adds_only_the_cross_attention(llm, encoder_folder):
    model = warm_started(llm, encoder_folder)
    layers = llm[1].config.num_hidden_layers
    assert model.load_report.unexpected == []
    new = {path.split("/", 2)[2] for path in model.load_report.missing}
    block = {"cross_attention", "cross_attention_norm", "cross_attention_gate"}
    if llm[0] == "gemma3":  # its blocks normalize their outputs too
        block.add("cross_attention_post_norm")
    assert {p.split("/")[0] for p in new} == block, new
    assert len([p for p in model.load_report.missing if p.endswith("cross_attention_gate")]) == layers
    np.testing.assert_array_equal(gates(model), np.zeros(layers))


def test_decoder_logits_equal_the_llm_whatever_the_encoder_reads(llm, encoder_folder):
    model = warm_started(llm, encoder_folder)
    decoder_ids = np.random.default_rng(3).integers(4, VOCAB, (2, 9))
    decoder_ids[:, 0] = START
    expected = llm_logits(llm[1], decoder_ids)
    assert np.abs(expected).std() > 0.5, "near-uniform reference logits would prove little"
    for seed in (0, 1):
        ids, mask = sources(seed)
        got = model(ids, mask, decoder_input_ids=decoder_ids).logits
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    # the cross-attention is live: opened gates make the encoder's input matter
    opened = model(ids, mask, decoder_input_ids=decoder_ids, params=with_gates(model.params, 1.0)).logits
    assert np.abs(np.asarray(opened) - expected).max() > 1e-2


def test_an_encoder_of_another_width_is_projected(llm, tmp_path):
    """A 48-wide encoder before the 32-wide LLM: enc_to_dec_proj, new like the cross-attention; the gates still
    hide both."""
    randomize_(transformers.BertModel(SMALL["bert"](hidden=48)), seed=3).save_pretrained(tmp_path)
    model = warm_started(llm, tmp_path)
    assert model.config.needs_projection and "enc_to_dec_proj/kernel" in model.load_report.missing
    decoder_ids = np.random.default_rng(10).integers(4, VOCAB, (2, 6))
    ids, mask = sources(1)
    np.testing.assert_allclose(np.asarray(model(ids, mask, decoder_input_ids=decoder_ids).logits),
                               llm_logits(llm[1], decoder_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_ids_equal_the_llm_generate(llm, encoder_folder, num_beams):
    model = warm_started(llm, encoder_folder)
    ids, mask = sources(0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=num_beams, do_sample=False)
    with torch.no_grad():
        expected = llm[1].generate(torch.full((2, 1), START), attention_mask=torch.ones(2, 1, dtype=torch.long),
                                   max_new_tokens=10, num_beams=num_beams, do_sample=False, pad_token_id=PAD,
                                   eos_token_id=EOS, bos_token_id=START).numpy()
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_bfloat16_logits_within_bound_of_the_llm(llm, encoder_folder):
    model = warm_started(llm, encoder_folder, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    decoder_ids = np.random.default_rng(9).integers(4, VOCAB, (2, 9))
    expected = llm_logits(llm[1], decoder_ids)
    ids, mask = sources(0)
    got = np.asarray(model(ids, mask, decoder_input_ids=decoder_ids).logits)
    assert got.dtype == np.float32 and not np.array_equal(got, expected)
    # about as far from float32 as transformers' own LM in bfloat16 (with these weights: 0.14-0.33, ours
    # 0.14-0.28)
    bf16_reference = llm_logits(copy.deepcopy(llm[1]).to(torch.bfloat16), decoder_ids)
    assert np.abs(got - expected).max() <= 1.5 * np.abs(bf16_reference - expected).max()
    assert np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2)).shape == (2, 5)


@pytest.mark.slow
def test_scanned_and_rematerialized_decoders_compute_what_the_unrolled_one_does(llm, encoder_folder):
    unrolled = warm_started(llm, encoder_folder)
    unrolled.params = with_gates(unrolled.params, 0.7)  # the cross-attention in play
    scanned = warm_started(llm, encoder_folder, scan_layers=True, remat="full")
    scanned.params = layout.to_layout(unrolled.unrolled_params(), scanned=True)
    ids, mask = sources(4)
    decoder_ids = np.random.default_rng(5).integers(4, VOCAB, (2, 6))
    np.testing.assert_allclose(np.asarray(scanned(ids, mask, decoder_input_ids=decoder_ids).logits),
                               np.asarray(unrolled(ids, mask, decoder_input_ids=decoder_ids).logits), atol=1e-5, rtol=0)
    for num_beams in (1, 3):
        np.testing.assert_array_equal(
            np.asarray(scanned.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=num_beams)),
            np.asarray(unrolled.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=num_beams)))


@pytest.mark.slow
def test_a_short_fine_tune_opens_the_gates_and_learns_to_copy(llm, encoder_folder):
    """A copy task (the target is the source): the LLM alone cannot see the source, so only the cross-attention
    can lower the loss; every layer's gate moves off 0 (where it starts: the gates get a gradient there), and one
    opens well past it. How far each gate goes varies with the CPU's floating-point kernels (found: 0.02-0.22)."""
    model = warm_started(llm, encoder_folder)
    rng = np.random.default_rng(6)
    ids = rng.integers(4, 20, (16, 6))
    mask = np.ones_like(ids)
    loss_fn = jax.jit(lambda p: model(ids, mask, labels=ids, params=p).loss)
    optimizer = optax.adam(3e-2)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: model(ids, mask, labels=ids, params=p).loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = model.params, optimizer.init(model.params)
    first = float(loss_fn(params))
    for _ in range(40):
        params, opt_state, _ = train_step(params, opt_state)
    model.params = params
    assert float(loss_fn(params)) < 0.5 * first, (first, float(loss_fn(params)))
    opened = np.abs(gates(model))
    assert np.all(opened > 0.01) and opened.max() > 0.1, opened


def test_save_load_and_the_llm_export_are_exact(llm, encoder_folder, tmp_path):
    model = warm_started(llm, encoder_folder)
    # a trained pair: the LLM's weights moved, the gates open
    leaves, tree = jax.tree.flatten(model.params)
    noise = jax.random.split(jax.random.key(0), len(leaves))
    model.params = with_gates(jax.tree.unflatten(
        tree, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise)]), 0.5)
    model.save_pretrained(tmp_path / "pair")
    loaded = EncoderDecoderModel.from_pretrained(tmp_path / "pair")
    jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
    ids, mask = sources(7)
    decoder_ids = np.random.default_rng(8).integers(4, VOCAB, (2, 5))
    np.testing.assert_array_equal(np.asarray(loaded(ids, mask, decoder_input_ids=decoder_ids).logits),
                                  np.asarray(model(ids, mask, decoder_input_ids=decoder_ids).logits))
    # the LLM alone, back in its transformers class: the pair's decoder with the gates closed
    model.export_part_pytorch("decoder", tmp_path / "llm")
    reloaded, info = LLMS[llm[0]][1].from_pretrained(tmp_path / "llm", output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == [], info
    assert any("cross_attn" in key for key in info["unexpected_keys"]), info
    closed = model(ids, mask, decoder_input_ids=decoder_ids, params=with_gates(model.params, 0.0)).logits
    np.testing.assert_allclose(llm_logits(reloaded.eval(), decoder_ids), np.asarray(closed), atol=1e-4, rtol=0)


def test_unsupported_llm_settings_are_refused_with_the_fix(llm, encoder_folder, tmp_path):
    with pytest.raises(ConfigError, match="decoder only"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(llm[2], encoder_folder)
    scaled = shutil.copytree(llm[2], tmp_path / "llama3-scaled")
    config = json.loads((scaled / "config.json").read_text())
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    # Gemma 3 has rotary parameters per kind of layer
    config["rope_parameters"] = ({**config["rope_parameters"], "full_attention": llama3} if llm[0] == "gemma3"
                                 else llama3)
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope type 'llama3' is not supported; only the default"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(encoder_folder, scaled, decoder_start_token_id=START)
