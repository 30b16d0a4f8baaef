"""The rest of transformers' EncoderDecoderModel surface, against transformers' PyTorch on the same weights:
encode / decode / init_cache and ``encoder_outputs=``, attentions and hidden states, the cross-attention plot,
``tie_encoder_decoder``, and ``to_bf16`` / ``to_fp16`` / ``to_fp32``."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from hf_reference import EOS, PAD, PAIRS, START, SMALL, batch, by_pair, hf_encoder_decoder, torch_forward
from jaxencdec import EncoderDecoderModel
from jaxencdec.config import BertConfig, EncoderDecoderConfig, HFConfig
from jaxencdec.errors import ConfigError
from jaxencdec.models.encoder_decoder import DecoderCache, EncoderOutput, shift_tokens_right
from jaxencdec.train import step as st
from jaxencdec.visualize import cross_attention_matrix, plot_cross_attention

RECORDED = ("encoder_hidden_states", "encoder_attentions", "decoder_hidden_states", "decoder_attentions",
            "cross_attentions")


def _load_pair(name: str, hf_pair):
    """(name, transformers model with eager attention, which returns attention probabilities, our model)."""
    hf, folder = hf_pair(name)
    return name, hf, EncoderDecoderModel.from_pretrained(folder)


@pytest.fixture(scope="module", params=by_pair(list(PAIRS)))
def pair(request, hf_pair):
    return _load_pair(request.param, hf_pair)


@pytest.fixture(scope="module")
def one_pair(hf_pair):
    """For checks that one pair suffices for: bert2gpt2 with enc_to_dec_proj."""
    return _load_pair("bert2gpt2-proj", hf_pair)


def _decoder_batch(seed=5):
    """Sources with padding, teacher-forced decoder inputs with padding at the end of some rows."""
    ids, mask, labels = batch(seed)
    decoder_ids = np.where(labels == -100, PAD, labels)
    return ids, mask, decoder_ids, (labels != -100).astype(np.int64)


def _torch(*arrays):
    return [torch.tensor(np.asarray(a)) for a in arrays]


# ------------------------------------------------------------------ attentions and hidden states


def test_attentions_and_hidden_states_match_transformers(pair):
    _, hf, ours = pair
    ids, mask, decoder_ids, decoder_mask = _decoder_batch()
    t_ids, t_mask, t_dec, t_dec_mask = _torch(ids, mask, decoder_ids, decoder_mask)
    with torch.no_grad():
        expected = hf(input_ids=t_ids, attention_mask=t_mask, decoder_input_ids=t_dec,
                      decoder_attention_mask=t_dec_mask, output_attentions=True, output_hidden_states=True)
    got = ours(ids, mask, decoder_ids, decoder_mask, output_attentions=True, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(got.logits), expected.logits.numpy(), atol=1e-4, rtol=0)
    for field in RECORDED:
        mine, theirs = getattr(got, field), getattr(expected, field)
        assert len(mine) == len(theirs) > 0, field
        for layer, (a, b) in enumerate(zip(mine, theirs)):
            assert a.shape == tuple(b.shape), (field, layer)
            # probabilities to 1e-5; hidden states to 1e-5 of their largest value (GPT-2's residual stream
            # reaches ~20 here, where float32 sums differ in the 6th digit between the two libraries)
            scale = max(1.0, float(b.abs().max())) if "hidden" in field else 1.0
            np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5 * scale, rtol=0,
                                       err_msg=f"{field}[{layer}]")
    # flags off: nothing recorded
    plain = ours(ids, mask, decoder_ids, decoder_mask)
    assert all(getattr(plain, field) is None for field in RECORDED)
    np.testing.assert_allclose(np.asarray(plain.logits), np.asarray(got.logits), atol=1e-5, rtol=0)


def test_training_mode_attentions_are_after_dropout_as_in_transformers(one_pair):
    """In training mode transformers returns the attention weights after dropout: entries a real query attends to
    are exactly 0 where dropped, so rows no longer sum to 1. Ours too (RNGs differ, so not the same entries)."""
    _, hf, ours = one_pair
    ids, mask, decoder_ids, decoder_mask = _decoder_batch()
    t_ids, t_mask, t_dec, t_dec_mask = _torch(ids, mask, decoder_ids, decoder_mask)
    torch.manual_seed(0)
    hf.train()
    try:
        expected = hf(input_ids=t_ids, attention_mask=t_mask, decoder_input_ids=t_dec,
                      decoder_attention_mask=t_dec_mask, output_attentions=True)
    finally:
        hf.eval()
    got = ours(ids, mask, decoder_ids, decoder_mask, output_attentions=True, train=True,
               dropout_rng=jax.random.key(0))
    key_mask = {"encoder_attentions": mask, "cross_attentions": mask, "decoder_attentions": decoder_mask}
    for field, keys in key_mask.items():
        for name, layers in (("transformers", [t.detach().numpy() for t in getattr(expected, field)]),
                             ("jaxencdec", [np.asarray(a) for a in getattr(got, field)])):
            weights = np.stack(layers)  # [layers, batch, heads, queries, keys]
            attended = np.broadcast_to(np.asarray(keys, bool)[None, :, None, None, :], weights.shape)
            if field == "decoder_attentions":  # causal: query i attends to keys <= i
                q, k = weights.shape[-2:]
                attended = attended & np.tri(q, k, dtype=bool)
            assert np.mean(weights[attended] == 0) > 0.02, (name, field)  # dropped entries
            assert np.abs(weights.sum(-1)[attended.any(-1)] - 1).max() > 1e-3, (name, field)


def test_only_the_requested_outputs_are_recorded(one_pair):
    _, _, ours = one_pair
    ids, mask, decoder_ids, _ = _decoder_batch()
    attentions = ours(ids, mask, decoder_ids, output_attentions=True)
    assert attentions.encoder_hidden_states is None and attentions.decoder_hidden_states is None
    assert len(attentions.cross_attentions) == ours.config.decoder_spec.num_layers
    states = ours(ids, mask, decoder_ids, output_hidden_states=True)
    assert states.cross_attentions is None and states.encoder_attentions is None
    assert len(states.encoder_hidden_states) == ours.config.encoder_spec.num_layers + 1


def test_cross_attention_plot_writes_a_png_of_the_averaged_matrix(one_pair, tmp_path):
    _, _, ours = one_pair
    ids, mask, decoder_ids, _ = _decoder_batch()
    out = ours(ids, mask, decoder_ids, output_attentions=True)
    example = 1
    stacked = np.stack([np.asarray(a) for a in out.cross_attentions])  # [layers, batch, heads, tgt, src]
    source = [f"s{i}" for i in range(int(mask[example].sum()))]
    target = [f"t{i}" for i in range(decoder_ids.shape[1])]
    for layer, expected in ((None, stacked[:, example].mean(axis=(0, 1))), (-1, stacked[-1, example].mean(axis=0))):
        np.testing.assert_allclose(cross_attention_matrix(out.cross_attentions, example, layer), expected,
                                   rtol=1e-6)
        path = tmp_path / f"layer{layer}.png"
        figure = plot_cross_attention(out.cross_attentions, source, target, path, example=example, layer=layer)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        axes = figure.axes[0]
        np.testing.assert_allclose(np.asarray(axes.images[0].get_array()), expected[:len(target), :len(source)],
                                   rtol=1e-6)
        assert [t.get_text() for t in axes.get_xticklabels()] == source
        assert [t.get_text() for t in axes.get_yticklabels()] == target
    with pytest.raises(ValueError, match="source_tokens has 10 tokens"):
        plot_cross_attention(out.cross_attentions, ["x"] * 10, target, tmp_path / "x.png")
    with pytest.raises(ValueError, match="output_attentions=True"):
        cross_attention_matrix(ours(ids, mask, decoder_ids).cross_attentions)


# ------------------------------------------------------------------ encode / decode / init_cache


def test_encoder_outputs_give_transformers_logits(pair):
    """Given the same encoder states (arbitrary ones, not the encoder's), both decoders agree."""
    _, hf, ours = pair
    ids, mask, decoder_ids, decoder_mask = _decoder_batch()
    states = np.random.default_rng(0).normal(size=(*ids.shape, ours.config.encoder.hidden)).astype(np.float32)
    with torch.no_grad():
        expected = hf(encoder_outputs=(torch.tensor(states),), attention_mask=torch.tensor(mask),
                      decoder_input_ids=torch.tensor(decoder_ids),
                      decoder_attention_mask=torch.tensor(decoder_mask)).logits.numpy()
    for given in (EncoderOutput(jnp.asarray(states)), (states,), states):
        got = ours(attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask,
                   encoder_outputs=given)
        np.testing.assert_allclose(np.asarray(got.logits), expected, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.asarray(got.encoder_last_hidden_state), states)


def test_encode_then_call_with_encoder_outputs_equals_the_full_pass(one_pair):
    _, _, ours = one_pair
    ids, mask, _, _ = _decoder_batch()
    _, _, labels = batch(5)
    full = ours(ids, mask, labels=labels, output_attentions=True, output_hidden_states=True)
    encoded = ours.encode(ids, mask, output_attentions=True, output_hidden_states=True)
    assert encoded.last_hidden_state.shape == (*ids.shape, ours.config.encoder.hidden)
    again = ours(attention_mask=mask, labels=labels, encoder_outputs=encoded)
    np.testing.assert_allclose(np.asarray(again.logits), np.asarray(full.logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(again.loss), float(full.loss), rtol=1e-6)
    for mine, theirs in ((encoded.hidden_states, full.encoder_hidden_states),
                         (encoded.attentions, full.encoder_attentions),
                         (again.encoder_hidden_states, full.encoder_hidden_states)):  # carried through
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_decode_with_a_cache_step_by_step_reproduces_the_forward_logits(pair):
    _, _, ours = pair
    ids, mask, decoder_ids, _ = _decoder_batch()
    expected = ours(ids, mask, decoder_ids).logits
    encoded = ours.encode(ids, mask)
    whole = ours.decode(decoder_ids, encoded, mask)
    assert whole.past_key_values is None
    np.testing.assert_allclose(np.asarray(whole.logits), np.asarray(expected), atol=1e-5, rtol=0)
    rows, length = decoder_ids.shape
    cache = ours.init_cache(rows, length + 2, encoded)
    assert isinstance(cache, DecoderCache) and int(cache.index) == 0
    steps = []
    for t in range(length):
        out = ours.decode(decoder_ids[:, t:t + 1], encoded, mask, past_key_values=cache)
        cache = out.past_key_values
        steps.append(np.asarray(out.logits[:, 0]))
    assert int(cache.index) == length
    np.testing.assert_allclose(np.stack(steps, axis=1), np.asarray(expected), atol=1e-5, rtol=0)
    # a chunk of several tokens at once (a prompt) continues the same cache
    cache = ours.init_cache(rows, length)
    first = ours.decode(decoder_ids[:, :3], encoded, mask, past_key_values=cache)
    rest = ours.decode(decoder_ids[:, 3:], encoded, mask, past_key_values=first.past_key_values,
                       output_attentions=True)
    np.testing.assert_allclose(np.concatenate([first.logits, rest.logits], axis=1), np.asarray(expected),
                               atol=1e-5, rtol=0)
    assert rest.attentions[0].shape == (rows, ours.config.decoder_spec.num_heads, length - 3, length)
    with pytest.raises(ValueError, match="no room"):
        ours.decode(decoder_ids[:, :1], encoded, mask, past_key_values=rest.past_key_values)


def test_greedy_loop_with_encode_and_decode_reproduces_generate(pair):
    _, _, ours = pair
    ids, mask, _, _ = _decoder_batch()
    new_tokens = 8
    # plain greedy: no forced EOS at the end (BART's generation config forces one)
    expected = np.asarray(ours.generate(ids, mask, max_new_tokens=new_tokens, num_beams=1, do_sample=False,
                                        forced_eos_token_id=None))
    encoded = ours.encode(ids, mask)
    cache = ours.init_cache(len(ids), new_tokens)
    tokens = np.full((len(ids), 1), START, np.int32)
    sequences, finished = [tokens[:, 0]], np.zeros(len(ids), bool)
    while len(sequences) <= new_tokens and not finished.all():
        out = ours.decode(tokens, encoded, mask, past_key_values=cache)
        cache = out.past_key_values
        chosen = np.where(finished, PAD, np.argmax(np.asarray(out.logits[:, -1]), axis=-1))
        finished |= chosen == EOS
        sequences.append(chosen)
        tokens = chosen[:, None].astype(np.int32)
    np.testing.assert_array_equal(np.stack(sequences, axis=1), expected)


def test_one_compilation_serves_every_decode_step(pair):
    """The cache's index is traced: a loop of steps compiles once."""
    _, _, ours = pair
    from jaxencdec import modeling

    ids, mask, decoder_ids, _ = _decoder_batch()
    encoded = ours.encode(ids, mask)
    cache = ours.init_cache(len(ids), 4)
    out = ours.decode(decoder_ids[:, :1], encoded, mask, past_key_values=cache)
    compiled = modeling._decode._cache_size()
    for t in range(1, 4):
        out = ours.decode(decoder_ids[:, t:t + 1], encoded, mask, past_key_values=out.past_key_values)
    assert modeling._decode._cache_size() == compiled


def test_models_of_one_config_share_their_init_trace_and_compilation(tmp_path):
    """A second model of the same config and dtypes, built or loaded from a folder, traces and compiles no init
    again: random init and the parameter shapes a load checks against are programs of the module, not of the model
    object (the seed is traced: each model gets its own values)."""
    from jaxencdec.models.encoder_decoder import abstract_variables, fresh_params

    part = BertConfig(vocab_size=23, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=11)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(part, part, decoder_start_token_id=1, pad_token_id=0)
    first = EncoderDecoderModel(config, seed=0)
    shapes, axes = first.param_shapes(), first.logical_axes()
    compiled, traced = fresh_params._cache_size(), abstract_variables.cache_info().misses
    second = EncoderDecoderModel(config, seed=1)
    assert second.param_shapes() == shapes and second.logical_axes() == axes
    first.save_pretrained(tmp_path / "saved")
    assert EncoderDecoderModel.from_pretrained(tmp_path / "saved").num_parameters() == first.num_parameters()
    assert (fresh_params._cache_size(), abstract_variables.cache_info().misses) == (compiled, traced)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.params),
                                                         jax.tree.leaves(second.params)))


def test_scoring_many_candidates_against_one_encoded_source(one_pair):
    """A decoder batch k times the encoder batch reads each source once: the same logits as repeating it."""
    _, _, ours = one_pair
    ids, mask, decoder_ids, decoder_mask = _decoder_batch()
    encoded = ours.encode(ids[:1], mask[:1])
    candidates, candidate_mask = decoder_ids, decoder_mask  # 3 candidates for source 0
    shared = ours.decode(candidates, encoded, mask[:1], candidate_mask, output_attentions=True)
    repeated = ours.decode(candidates, EncoderOutput(jnp.repeat(encoded.last_hidden_state, 3, axis=0)),
                           np.repeat(mask[:1], 3, axis=0), candidate_mask, output_attentions=True)
    np.testing.assert_allclose(np.asarray(shared.logits), np.asarray(repeated.logits), atol=1e-5, rtol=0)
    for a, b in zip(shared.cross_attentions, repeated.cross_attentions):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple k of it"):
        ours.decode(candidates[:2], ours.encode(ids, mask), mask)


def test_bad_encode_decode_inputs_are_clear_errors(one_pair):
    _, _, ours = one_pair
    ids, mask, decoder_ids, _ = _decoder_batch()
    encoded = ours.encode(ids, mask)
    with pytest.raises(ValueError, match=r"encoder_outputs must hold the encoder's last hidden state \[batch, "):
        ours(attention_mask=mask, decoder_input_ids=decoder_ids, encoder_outputs=encoded.last_hidden_state[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(attention_mask=mask[:, :4], decoder_input_ids=decoder_ids, encoder_outputs=encoded)
    with pytest.raises(ValueError, match="decoder_input_ids has 2 rows but encoder_outputs has batch 3"):
        ours(attention_mask=mask, decoder_input_ids=decoder_ids[:2], encoder_outputs=encoded)
    with pytest.raises(ValueError, match="decoder_attention_mask has shape"):
        ours.decode(decoder_ids[:, :1], encoded, mask, np.ones((3, 1)), past_key_values=ours.init_cache(3, 5))
    with pytest.raises(ValueError, match="past_key_values holds 2 rows"):
        ours.decode(decoder_ids[:, :1], encoded, mask, past_key_values=ours.init_cache(2, 5))
    with pytest.raises(ValueError, match="max_length 999 is more than"):
        ours.init_cache(3, 999)
    with pytest.raises(ValueError, match="past_key_values must be a DecoderCache"):
        ours.decode(decoder_ids[:, :1], encoded, mask, past_key_values=((1, 2),))


# ------------------------------------------------------------------ parameter dtypes


def test_to_bf16_fp16_fp32_cast_floating_leaves_where_the_mask_says(one_pair):
    _, _, ours = one_pair
    flat = traverse_util.flatten_dict(ours.params)
    for method, dtype in ((ours.to_bf16, jnp.bfloat16), (ours.to_fp16, jnp.float16)):
        cast = traverse_util.flatten_dict(method(ours.params))
        assert all(v.dtype == dtype for v in cast.values())
        np.testing.assert_array_equal(np.asarray(cast[("encoder", "pooler", "kernel")], np.float32),
                                      np.asarray(flat[("encoder", "pooler", "kernel")].astype(dtype), np.float32))
    assert all(v.dtype == jnp.float32 for v in traverse_util.flatten_dict(ours.params).values())  # unchanged
    # transformers' documented use: keep the norms in float32
    mask = traverse_util.unflatten_dict({k: "norm" not in k[-2] for k in flat})
    mixed = traverse_util.flatten_dict(ours.to_bf16(mask=mask))
    assert {str(v.dtype) for k, v in mixed.items() if "norm" in k[-2]} == {"float32"}
    assert {str(v.dtype) for k, v in mixed.items() if "norm" not in k[-2]} == {"bfloat16"}
    back = traverse_util.flatten_dict(ours.to_fp32(traverse_util.unflatten_dict(mixed)))
    assert all(v.dtype == jnp.float32 for v in back.values())
    ints = ours.to_bf16({"a": jnp.arange(3), "b": jnp.ones(2)})
    assert ints["a"].dtype == jnp.int32 and ints["b"].dtype == jnp.bfloat16  # integer leaves are left alone
    with pytest.raises(ValueError, match="structure of params"):
        ours.to_bf16(mask={"encoder": True})
    logits = ours(*_decoder_batch()[:3], params=ours.to_bf16()).logits
    assert np.isfinite(np.asarray(logits)).all()


# ------------------------------------------------------------------ tie_encoder_decoder


def _tie_like_transformers_4(hf: transformers.EncoderDecoderModel) -> list[tuple[str, str]]:
    """Ties ``hf`` as transformers 4's ``_tie_encoder_decoder_weights`` did (transformers 5 no longer does): each
    module of the decoder's base model that the encoder has under the same name shares its weight and bias (the
    decoder's values win, as there). Returns the (encoder, decoder) parameter names tied."""
    encoder, decoder = hf.encoder, hf.decoder.base_model
    encoder_modules = dict(encoder.named_modules())
    tied = []
    for name, module in decoder.named_modules():
        if name in encoder_modules and name and "weight" in module._parameters:
            for leaf in ("weight", "bias"):
                if module._parameters.get(leaf) is not None:
                    setattr(encoder_modules[name], leaf, module._parameters[leaf])
                    tied.append((f"encoder.{name}.{leaf}", f"decoder.{hf.decoder.base_model_prefix}.{name}.{leaf}"))
    hf.config.tie_encoder_decoder = True
    return tied


# BERT, and BertGeneration: the layout of the tied summarizers warm-started from BERT/RoBERTa (roberta2roberta_L-24_bbc)
TIED_KINDS = ("bert", "bert-generation")


@pytest.fixture(scope="module")
def tied_pairs(tmp_path_factory):
    """``kind -> (model, tied names, state, folder)``: a transformers ``kind``2``kind`` tied as transformers 4 tied
    it, and its checkpoint as transformers 4 saved it (safetensors keep one copy of each tied tensor: the
    decoder's), built once per kind."""

    @functools.cache
    def get(kind: str):
        hf = hf_encoder_decoder(kind, kind, seed=3)
        hf.set_attn_implementation("eager")
        tied = _tie_like_transformers_4(hf)
        assert len(tied) > 30
        folder = tmp_path_factory.mktemp(f"tied-{kind}")
        hf.config.to_json_file(folder / "config.json")
        # the LM head's output weight is the word table: transformers drops it from a save, tied or not
        dropped = {f"decoder.{name}" for name in hf.decoder._tied_weights_keys}
        state = {k: v.numpy() for k, v in hf.state_dict().items() if k not in dropped}
        save_file({k: v for k, v in state.items() if k not in {e for e, _ in tied}}, str(folder / "model.safetensors"))
        return hf, tied, state, folder

    return get


@pytest.mark.parametrize("kind", TIED_KINDS)
def test_tied_checkpoint_loads_with_shared_parameters_once(tied_pairs, kind, tmp_path):
    hf, tied, state, folder = tied_pairs(kind)
    ours = EncoderDecoderModel.from_pretrained(folder)
    assert ours.config.tie_encoder_decoder
    paths = set(traverse_util.flatten_dict(ours.params, sep="/"))
    assert not any(p.startswith(("decoder/embeddings", "decoder/layers_0/self_attention/", "decoder/layers_1/mlp"))
                   for p in paths)
    assert "decoder/layers_0/cross_attention/query/kernel" in paths and "decoder/lm_head/bias" in paths
    ids, mask, labels = batch(4)
    logits, loss = torch_forward(hf, ids, mask, labels)
    out = ours(ids, mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    # the same checkpoint with the other copy missing, and with both copies
    variants = {"decoder copies absent": {k: v for k, v in state.items() if k not in {d for _, d in tied}},
                "both copies": state}
    for name, tensors in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((folder / "config.json").read_text())
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        again = EncoderDecoderModel.from_pretrained(tmp_path / name)
        assert again.load_report.unexpected == [], name
        np.testing.assert_array_equal(np.asarray(again(ids, mask, labels=labels).logits), np.asarray(out.logits))


def test_tied_checkpoint_with_differing_copies_takes_the_decoders(tied_pairs, tmp_path):
    """transformers 4 loaded both copies into the one shared tensor, the decoder's last."""
    _, tied, state, folder = tied_pairs("bert")
    encoder_name, decoder_name = tied[0]
    changed = {**state, encoder_name: state[encoder_name] + 1.0}
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(changed, str(tmp_path / "model.safetensors"))
    ours = EncoderDecoderModel.from_pretrained(tmp_path)
    assert ours.load_report.unexpected == [encoder_name]
    np.testing.assert_array_equal(ours.pytorch_state_dict()[encoder_name], state[decoder_name])


def _step_batch(config):
    ids, mask, labels = batch(seed=6)
    decoder_ids = np.asarray(shift_tokens_right(jnp.asarray(labels), config.pad_token_id,
                                                config.decoder_start_token_id))
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
            "decoder_attention_mask": np.ones_like(decoder_ids), "labels": labels}


def test_tied_bert2bert_trains_saves_and_exports_as_pytorch_does(tied_pairs, tmp_path):
    """Three SGD steps of the train step equal three PyTorch SGD steps on the tied model: each shared tensor
    gets the sum of its encoder and decoder gradients. Then save -> load is exact and the PyTorch export
    gives transformers the same logits."""
    hf, _, _, folder = tied_pairs("bert")
    ours = EncoderDecoderModel.from_pretrained(folder)
    train_batch = _step_batch(hf.config)
    learning_rate = 0.5
    optimizer = optax.sgd(learning_rate)
    train_step = jax.jit(st.make_train_step(ours.module, optimizer, optax.constant_schedule(learning_rate),
                                            dropout=False, mesh=None))
    state = st.TrainState(step=jnp.zeros((), jnp.int32), params=ours.params, opt_state=optimizer.init(ours.params),
                          rng=jax.random.PRNGKey(0))
    torch_model = hf_encoder_decoder("bert", "bert", seed=3)
    torch_model.load_state_dict(hf.state_dict())
    tied = _tie_like_transformers_4(torch_model)
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=learning_rate)
    t_ids, t_mask, t_dec, t_labels = _torch(train_batch["input_ids"], train_batch["attention_mask"],
                                            train_batch["decoder_input_ids"], train_batch["labels"])
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, train_batch)
        torch_optimizer.zero_grad()
        logits = torch_model(input_ids=t_ids, attention_mask=t_mask, decoder_input_ids=t_dec).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_labels.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        torch_optimizer.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    ours.params = state.params
    trained = ours.pytorch_state_dict()
    torch_state = torch_model.state_dict()
    for encoder_name, decoder_name in tied:  # one tensor under both names, trained by both uses
        np.testing.assert_allclose(trained[encoder_name], torch_state[encoder_name].numpy(), atol=2e-5, rtol=1e-4)
        np.testing.assert_array_equal(trained[encoder_name], trained[decoder_name])
    # save -> load: bit-identical, the shared tensors stored once
    ours.save_pretrained(tmp_path / "saved")
    reloaded = EncoderDecoderModel.from_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["tie_encoder_decoder"] is True
    a, b = (traverse_util.flatten_dict(m.params, sep="/") for m in (ours, reloaded))
    assert a.keys() == b.keys() and not any(k.startswith("decoder/embeddings") for k in a)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    # export: transformers 5 has no tie_encoder_decoder, so both copies are written; it loads them (equal) and
    # gives our logits; the config keeps tie_encoder_decoder for transformers 4, which ties them on load.
    ours.export_pytorch(tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(np.array_equal(exported[e], exported[d]) for e, d in tied)
    hf_reloaded = transformers.EncoderDecoderModel.from_pretrained(tmp_path / "export").eval()
    assert hf_reloaded.config.tie_encoder_decoder is True
    ids, mask, labels = batch(7)
    expected_logits, _ = torch_forward(hf_reloaded, ids, mask, labels)
    np.testing.assert_allclose(np.asarray(ours(ids, mask, labels=labels).logits), expected_logits, atol=1e-4,
                               rtol=0)
    _tie_like_transformers_4(hf_reloaded)  # tied as transformers 4 would: nothing changes
    np.testing.assert_array_equal(torch_forward(hf_reloaded, ids, mask, labels)[0], expected_logits)
    # the tied decoder's cached decoding: beam search ids as transformers'
    with torch.no_grad():
        expected_ids = hf_reloaded.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                            max_new_tokens=6, num_beams=3).numpy()
    assert expected_ids.shape[1] > 3
    np.testing.assert_array_equal(np.asarray(ours.generate(ids, mask, max_new_tokens=6, num_beams=3)), expected_ids)


def test_tied_warm_start_shares_the_checkpoint_values(tmp_path):
    """from_encoder_decoder_pretrained(tie_encoder_decoder=True): the shared tensors hold the checkpoint's values
    (the decoder's checkpoint, loaded last, wins as in transformers 4), the decoder's cross-attention is new."""
    torch.manual_seed(0)
    bert = transformers.BertModel(SMALL["bert"]())
    bert.save_pretrained(tmp_path / "bert")
    ours = EncoderDecoderModel.from_encoder_decoder_pretrained(tmp_path / "bert", tmp_path / "bert",
                                                                tie_encoder_decoder=True,
                                                                decoder_start_token_id=START, pad_token_id=PAD)
    assert ours.config.tie_encoder_decoder
    assert all("cross_attention" in k or "/lm_head/" in k for k in ours.load_report.missing)
    checkpoint = {k: v.numpy() for k, v in bert.state_dict().items()}
    exported = ours.pytorch_state_dict()
    np.testing.assert_array_equal(exported["encoder.encoder.layer.1.output.dense.weight"],
                                  checkpoint["encoder.layer.1.output.dense.weight"])
    np.testing.assert_array_equal(exported["decoder.bert.embeddings.word_embeddings.weight"],
                                  checkpoint["embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("encoder, decoder, message", [
    (SMALL["bert"](), SMALL["gpt2"](), "needs a BERT, RoBERTa-family or BertGeneration encoder and decoder"),
    (SMALL["bert"](), SMALL["bert-generation"](), "type_vocab_size 2 vs 0"),
    (SMALL["bert"](), SMALL["bert"](hidden=48), "hidden_size 32 vs 48"),
    (SMALL["bert"](layers=1), SMALL["bert"](layers=2), "the decoder has 2 layers and the encoder only 1"),
])
def test_untieable_pairs_are_config_errors(encoder, decoder, message):
    parts = [HFConfig.from_dict(c.to_dict()) for c in (encoder, decoder)]
    with pytest.raises(ConfigError, match=message):
        EncoderDecoderConfig.from_encoder_decoder_configs(*parts, tie_encoder_decoder=True)
