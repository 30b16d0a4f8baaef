"""transformers' own encoder-decoder test suites, ported to jaxencdec: the mixins of
``tests/models/encoder_decoder/test_modeling_encoder_decoder.py`` (PyTorch) and, for what it checks beyond them,
of ``test_modeling_flax_encoder_decoder.py`` (transformers 4's Flax), on their pairs and with their model testers'
configs and inputs (batch 13, length 7, vocabulary 99, width 32, 2 layers, 4 heads; the BART decoder 16 wide, so
``enc_to_dec_proj`` is in play). Where a suite checked a shape, the PyTorch ``EncoderDecoderModel`` of transformers 5
on the same weights is also the oracle for the values: logits and loss (1e-5) and generated ids.

Adapted: the suites' standalone encoder / decoder objects become transformers' PyTorch models saved to folders
(jaxencdec loads parts from checkpoints); ``loss.backward()`` becomes ``jax.grad``; "Flax -> PyTorch" is
``export_pytorch``. Not ported: the ProphetNet pair (not an architecture jaxencdec has);
``test_save_and_load_from_encoder_decoder_pretrained`` (jaxencdec does not save a pair's halves as standalone
models); ``test_encoder_decoder_model_output_attentions_from_config`` (jaxencdec's configs carry no output flags:
``output_attentions=True`` is the call's); the SDPA dispatch test (one attention implementation here); the
``bert-base-cased`` / ``gpt2`` / ``bart-base`` checkpoints and the bert2gpt2 CNN/DailyMail summary (no such weights
here: ``test_real_model_save_load_from_pretrained`` runs on the real MiniLM BERT that is); the Flax
``test_configuration_tie`` (the identity of a Flax module's config object).
"""

from __future__ import annotations

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
import pytest
import torch
import transformers

from hf_reference import by_pair
from jaxencdec import EncoderDecoderConfig, EncoderDecoderModel
from jaxencdec.architectures import HFConfig

BATCH, LENGTH, VOCAB, WIDTH = 13, 7, 99, 32


def _bert(**kw):  # BertModelTester
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, hidden_act="gelu", max_position_embeddings=512,
                                   type_vocab_size=16, initializer_range=0.02, **kw)


def _roberta(**kw):  # RobertaModelTester
    return transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=37, max_position_embeddings=512,
                                      type_vocab_size=16, **kw)


def _bert_generation(**kw):  # BertGenerationEncoderTester
    return transformers.BertGenerationConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=37,
                                             max_position_embeddings=50, **kw)


def _gpt2(**kw):  # GPT2ModelTester
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=512,
                                   bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, **kw)


def _bart(width=16, **kw):  # BartStandaloneDecoderModelTester
    return transformers.BartConfig(vocab_size=VOCAB, d_model=width, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4,
                                   decoder_ffn_dim=4, max_position_embeddings=30, eos_token_id=2, pad_token_id=1,
                                   bos_token_id=0, **kw)


# the suites' test classes: name -> (encoder config, its class, decoder config, its class)
PAIRS = {
    "bert": (_bert, transformers.BertModel, _bert, transformers.BertLMHeadModel),
    "bert-generation": (_bert_generation, transformers.BertGenerationEncoder, _bert_generation,
                        transformers.BertGenerationDecoder),
    "roberta": (_roberta, transformers.RobertaModel, _roberta, transformers.RobertaForCausalLM),
    "gpt2": (_bert, transformers.BertModel, _gpt2, transformers.GPT2LMHeadModel),
    "bart": (_bert, transformers.BertModel, _bart, transformers.BartForCausalLM),
}
FLAX_PAIRS = ("bert", "gpt2", "bart")  # the Flax suite's classes
TIEABLE = ("bert", "bert-generation", "roberta")  # tie_encoder_decoder needs one architecture on both sides


def _ids(rng, shape, vocab):
    return rng.integers(0, vocab, shape).astype(np.int64)


def _random_mask(rng, shape):
    """The testers' ``random_attention_mask``: random 0/1 with the last column 1."""
    mask = _ids(rng, shape, 2)
    mask[:, -1] = 1
    return mask


def prepare_config_and_inputs(name: str, seed: int = 0) -> dict:
    """A test class's ``prepare_config_and_inputs``: the configs (the decoder's with cross-attention), the inputs,
    precomputed encoder states and labels."""
    rng = np.random.default_rng(seed)
    encoder, _, decoder, _ = PAIRS[name]
    decoder_mask = _random_mask(rng, (BATCH, LENGTH))
    decoder_mask[:, 0] = 1  # a decoder row with nowhere to attend (causal mask on top) has no defined output
    return {"config": encoder(), "decoder_config": decoder(is_decoder=True, add_cross_attention=True),
            "input_ids": _ids(rng, (BATCH, LENGTH), VOCAB), "attention_mask": _random_mask(rng, (BATCH, LENGTH)),
            "decoder_input_ids": _ids(rng, (BATCH, LENGTH), VOCAB), "decoder_attention_mask": decoder_mask,
            "encoder_hidden_states": rng.normal(size=(BATCH, LENGTH, WIDTH)).astype(np.float32),
            "labels": _ids(rng, (BATCH, LENGTH), VOCAB)}


def save_parts(folder, name: str, inputs: dict) -> tuple[str, str]:
    """``get_encoder_decoder_model``: the standalone encoder and decoder (transformers' init, seed 0), saved."""
    _, encoder_class, _, decoder_class = PAIRS[name]
    torch.manual_seed(0)
    pooled = encoder_class in (transformers.BertModel, transformers.RobertaModel)
    kwargs = {"add_pooling_layer": False} if pooled else {}
    parts = encoder_class(inputs["config"], **kwargs), decoder_class(inputs["decoder_config"])
    folders = str(folder / "encoder"), str(folder / "decoder")
    for model, path in zip(parts, folders):
        model.save_pretrained(path)
    return folders


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """``pairs(name)`` -> ``(name, inputs, encoder folder, decoder folder, transformers' EncoderDecoderModel of
    those folders)``, made once per module; the model is also saved, in ``reference.folder``: with its new
    parameters (a projection), the values to compare."""
    made = {}

    def get(name):
        if name not in made:
            inputs = prepare_config_and_inputs(name)
            folder = tmp_path_factory.mktemp(name)
            folders = save_parts(folder, name, inputs)
            reference = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(*folders).eval()
            reference.save_pretrained(folder / "pair")
            reference.folder = str(folder / "pair")
            made[name] = (name, inputs, *folders, reference)
        return made[name]

    return get


@pytest.fixture(params=by_pair(list(PAIRS), fast=("bert",)))
def pair(request, pairs):
    """A suite's pair; the fast subset (``-m "not slow"``) runs BERT's (and the tests of the Flax suite's three
    classes below)."""
    return pairs(request.param)


def ours(hf_config) -> HFConfig:
    return HFConfig.from_dict(hf_config.to_dict())


def call(model, inputs: dict, **kwargs):
    return model(inputs["input_ids"], inputs["attention_mask"], decoder_input_ids=inputs["decoder_input_ids"],
                 decoder_attention_mask=inputs["decoder_attention_mask"], **kwargs)


def torch_call(model, inputs: dict, **kwargs):
    names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    with torch.no_grad():
        return model(**{k: torch.tensor(inputs[k]) for k in names}, **kwargs)


def with_projection_of(model: EncoderDecoderModel, reference) -> EncoderDecoderModel:
    """``model`` given ``reference``'s ``enc_to_dec_proj`` (new in both when built from parts, each initialized its
    own way), so that the two compute the same."""
    if hasattr(reference, "enc_to_dec_proj"):
        layer = reference.enc_to_dec_proj
        model.params = {**model.params, "enc_to_dec_proj": {"kernel": layer.weight.detach().numpy().T,
                                                            "bias": layer.bias.detach().numpy()}}
    return model


def assert_shapes(out, inputs: dict) -> None:
    assert out["logits"].shape == (BATCH, inputs["decoder_input_ids"].shape[1], VOCAB)
    assert out["encoder_last_hidden_state"].shape == (BATCH, LENGTH, WIDTH)


# ---------------------------------------------------------------------- the PyTorch suite's mixin


def test_encoder_decoder_model(pair):
    """From the parts; then from encoder states given as a ``BaseModelOutput`` (a mapping) and as a tuple."""
    name, inputs, encoder, decoder, reference = pair
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
    assert model.config.decoder.is_decoder and model.config.decoder.add_cross_attention
    assert model.config.is_encoder_decoder
    assert_shapes(call(model, inputs), inputs)
    same_weights = EncoderDecoderModel.from_pretrained(reference.folder)
    np.testing.assert_allclose(np.asarray(call(same_weights, inputs)["logits"]),
                               torch_call(reference, inputs).logits.numpy(), atol=1e-5)
    states = inputs["encoder_hidden_states"]
    for encoder_outputs in ({"last_hidden_state": states}, (states,)):
        given = model(None, inputs["attention_mask"], decoder_input_ids=inputs["decoder_input_ids"],
                      decoder_attention_mask=inputs["decoder_attention_mask"], encoder_outputs=encoder_outputs)
        assert_shapes(given, inputs)
        np.testing.assert_array_equal(np.asarray(given["encoder_last_hidden_state"]), states)


def test_encoder_decoder_model_from_pretrained_configs(pair):
    name, inputs, *_ = pair
    config = EncoderDecoderConfig.from_encoder_decoder_configs(ours(inputs["config"]), ours(inputs["decoder_config"]))
    assert config.decoder.is_decoder and config.is_encoder_decoder
    assert_shapes(call(EncoderDecoderModel(config), inputs), inputs)


@pytest.mark.parametrize("return_dict", [False, True])
def test_encoder_decoder_model_from_pretrained(pair, return_dict):
    _, inputs, encoder, decoder, _ = pair
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
    out = call(model, inputs, return_dict=return_dict)
    assert isinstance(out, tuple) != return_dict
    assert (out[0].shape, out[-1].shape) == ((BATCH, LENGTH, VOCAB), (BATCH, LENGTH, WIDTH))  # logits, encoder


def test_encoder_decoder_model_from_pretrained_using_model_paths(pair):
    """Part keyword arguments (no dropout in the encoder; BART's activation, else no dropout in the decoder)."""
    name, inputs, encoder, decoder, _ = pair
    kwargs = {"encoder_hidden_dropout_prob": 0.0}
    if not hasattr(inputs["decoder_config"], "hidden_dropout_prob"):  # BartConfig has none
        kwargs["decoder_activation_function"] = "gelu"
    else:
        kwargs["decoder_hidden_dropout_prob"] = 0.0
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder, **kwargs)
    for key, value in kwargs.items():
        part, field = key.split("_", 1)
        assert getattr(getattr(model.config, part), field) == value
    assert_shapes(call(model, inputs, return_dict=True), inputs)


def test_save_and_load_from_pretrained(pair, tmp_path):
    _, inputs, encoder, decoder, _ = pair
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
    before = np.nan_to_num(np.asarray(call(model, inputs)[0]))
    model.save_pretrained(tmp_path / "saved")
    after = np.nan_to_num(np.asarray(call(EncoderDecoderModel.from_pretrained(str(tmp_path / "saved")), inputs)[0]))
    assert np.amax(np.abs(after - before)) <= 1e-5


def _loss(model, params, inputs: dict, **kwargs):
    return model(inputs["input_ids"], inputs["attention_mask"], decoder_input_ids=inputs["decoder_input_ids"],
                 decoder_attention_mask=inputs["decoder_attention_mask"], labels=inputs["labels"], params=params,
                 **kwargs).loss


def test_encoder_decoder_model_labels(pair):
    """The loss of the labels (transformers': 1e-5) and its gradients ("backprop works")."""
    _, inputs, encoder, decoder, reference = pair
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
    out = model(inputs["input_ids"], inputs["attention_mask"], decoder_input_ids=inputs["decoder_input_ids"],
                decoder_attention_mask=inputs["decoder_attention_mask"], labels=inputs["labels"])
    assert_shapes(out, inputs)
    same_weights = EncoderDecoderModel.from_pretrained(reference.folder)
    got = call(same_weights, inputs, labels=inputs["labels"])["loss"]
    want = torch_call(reference, inputs, labels=torch.tensor(inputs["labels"])).loss.item()
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    grads = jax.grad(lambda p: _loss(model, p, inputs))(model.params)
    norms = [float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_encoder_decoder_model_output_attentions(pair):
    _, inputs, encoder, decoder, _ = pair
    # decoder inputs shorter than the encoder's, to harden the test
    inputs = {**inputs, "decoder_input_ids": inputs["decoder_input_ids"][:, :-1],
              "decoder_attention_mask": inputs["decoder_attention_mask"][:, :-1]}
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
    out = call(model, inputs, output_attentions=True)
    layers, heads = 2, 4
    assert len(out["encoder_attentions"]) == layers
    assert out["encoder_attentions"][0].shape[-3:] == (heads, LENGTH, LENGTH)
    assert len(out["decoder_attentions"]) == layers
    assert out["decoder_attentions"][0].shape[-3:] == (heads, LENGTH - 1, LENGTH - 1)
    assert len(out["cross_attentions"]) == layers
    assert out["cross_attentions"][0].shape[-3:] == (heads, LENGTH - 1, LENGTH)


def test_encoder_decoder_model_generate(pair):
    """Until max length (no EOS), starting from the decoder's pad token: the ids of transformers' generate."""
    _, inputs, encoder, decoder, _ = pair
    reference = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder).eval()
    model = with_projection_of(
        EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder, decoder_eos_token_id=None), reference)
    start, max_length = inputs["decoder_config"].pad_token_id, 20  # PretrainedConfig's max_length
    got = np.asarray(model.generate(inputs["input_ids"], decoder_start_token_id=start, max_length=max_length,
                                    eos_token_id=None))
    assert got.shape == (BATCH, max_length)
    reference.generation_config.eos_token_id = None
    reference.config.decoder.eos_token_id = None
    with torch.no_grad():
        want = reference.generate(torch.tensor(inputs["input_ids"]), decoder_start_token_id=start,
                                  max_length=max_length, eos_token_id=None, do_sample=False, num_beams=1).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", TIEABLE)
def test_encoder_decoder_model_shared_weights(pairs, name, tmp_path):
    """tie_encoder_decoder: fewer parameters, the outputs of the untied pair whose encoder holds the decoder's
    weights, also after a save and a load."""
    _, inputs, encoder, decoder, _ = pairs(name)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(ours(inputs["config"]), ours(inputs["decoder_config"]),
                                                               tie_encoder_decoder=True)
    tied = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder, tie_encoder_decoder=True)
    assert tied.config.tie_encoder_decoder == config.tie_encoder_decoder
    untied = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
    # the untied pair given the tied one's weights: each decoder parameter the tied decoder shares (holds not
    # itself) is the encoder's of the same name
    shared, own = flatten_dict(tied.params["encoder"]), flatten_dict(tied.params["decoder"])
    copied = {path: own.get(path, shared.get(path)) for path in flatten_dict(untied.params["decoder"])}
    assert any(path not in own for path in copied) and all(v is not None for v in copied.values())
    untied.params = {**untied.params, "encoder": tied.params["encoder"], "decoder": unflatten_dict(copied)}
    size = lambda params: sum(x.size for x in jax.tree.leaves(params))
    assert size(tied.params) < size(untied.params)
    want = np.asarray(call(untied, inputs)[0])
    np.testing.assert_allclose(np.asarray(call(tied, inputs)[0]), want, atol=1e-4)
    tied.save_pretrained(tmp_path / "tied")
    loaded = EncoderDecoderModel.from_pretrained(str(tmp_path / "tied"))
    assert size(loaded.params) < size(untied.params)
    np.testing.assert_allclose(np.asarray(call(loaded, inputs)[0]), want, atol=1e-4)


def test_training_gradient_checkpointing(pair):
    _, inputs, encoder, decoder, _ = pair
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder, decoder_start_token_id=0,
                                                                pad_token_id=0)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    rng = jax.random.key(0)
    grads = jax.grad(lambda p: _loss(model, p, inputs, dropout_rng=rng, train=True))(model.params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_real_model_save_load_from_pretrained(tmp_path):
    """On real pretrained weights (MiniLM, a BERT) as encoder and decoder: saved and reloaded, the same outputs."""
    from jaxencdec import assets

    minilm = assets.minilm_path()
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(minilm, minilm)
    rng = np.random.default_rng(0)
    vocab = model.config.encoder.vocab_size
    inputs = {"input_ids": _ids(rng, (13, 5), vocab), "decoder_input_ids": _ids(rng, (13, 1), vocab),
              "attention_mask": _ids(rng, (13, 5), 2)}
    before = np.nan_to_num(np.asarray(model(**inputs)[0]))
    model.save_pretrained(tmp_path / "saved")
    after = np.nan_to_num(np.asarray(EncoderDecoderModel.from_pretrained(str(tmp_path / "saved"))(**inputs)[0]))
    assert np.amax(np.abs(after - before)) <= 1e-5


# ---------------------------------------------------------------------- the Flax suite's mixin, beyond the above


@pytest.mark.parametrize("name", FLAX_PAIRS)
def test_flax_encoder_decoder_model_from_encoder_decoder_pretrained(pairs, name):
    """``encoder_*`` / ``decoder_*`` keyword arguments against the saved configs (``use_cache`` flipped) apply."""
    _, inputs, encoder, decoder, _ = pairs(name)
    enc_cache, dec_cache = inputs["config"].use_cache, inputs["decoder_config"].use_cache
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder, encoder_use_cache=not enc_cache,
                                                                decoder_use_cache=not dec_cache)
    assert model.config.encoder.to_dict()["use_cache"] == (not enc_cache)
    assert model.config.decoder.to_dict()["use_cache"] == (not dec_cache)
    assert call(model, inputs, output_hidden_states=True)["logits"].shape == (BATCH, LENGTH, VOCAB)


@pytest.mark.parametrize("name", FLAX_PAIRS)
def test_flax_encoder_decoder_model_generate(pairs, name):
    """transformers' fallbacks for the token ids (GPT-2 has no pad token: eos; BERT no bos: pad), then greedy
    search with the decoder's EOS: the ids of transformers' generate."""
    _, inputs, encoder, decoder, _ = pairs(name)
    decoder_config = inputs["decoder_config"]
    pad, eos = decoder_config.pad_token_id, decoder_config.eos_token_id
    start = getattr(decoder_config, "decoder_start_token_id", None)  # transformers 5 configs may lack it
    if pad is None and eos is not None:
        pad = eos
    if start is None:
        start = decoder_config.bos_token_id
    if start is None:
        start = pad
    ids = {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": start}
    fresh = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder).eval()
    model = with_projection_of(EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder), fresh)
    got = np.asarray(model.generate(inputs["input_ids"], **ids))
    with torch.no_grad():
        want = fresh.generate(torch.tensor(inputs["input_ids"]), do_sample=False, num_beams=1, **ids).numpy()
    assert got.shape[0] == BATCH and got.shape[1] <= 1 + 20  # the start token and at most 20 new ones
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("projected", [False, True], ids=["same-width", "enc_to_dec_proj"])
def test_pt_flax_equivalence(tmp_path, projected):
    """Per Flax class: the output tuples of a pair built from configs agree with PyTorch's (1e-5), also after a
    PyTorch save loaded by jaxencdec and a jaxencdec export loaded by transformers; decoders as wide as the encoder
    (no projection) and twice as wide (``enc_to_dec_proj``)."""
    for name in FLAX_PAIRS:
        inputs = prepare_config_and_inputs(name)
        decoder_config = inputs["decoder_config"]
        decoder_config.use_cache = False
        assert getattr(decoder_config, "cross_attention_hidden_size", None) is None
        width = 2 * WIDTH if projected else WIDTH
        for key in ("hidden_size", "n_embd", "d_model"):
            if key in decoder_config.to_dict():
                setattr(decoder_config, key, width)
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(inputs["config"], decoder_config)
        torch.manual_seed(0)
        pt_model = transformers.EncoderDecoderModel(config).eval()
        assert hasattr(pt_model, "enc_to_dec_proj") == projected
        want = [t.numpy() for t in torch_call(pt_model, inputs).to_tuple()]
        pt_model.save_pretrained(tmp_path / name / "pt")
        model = EncoderDecoderModel.from_pretrained(str(tmp_path / name / "pt"))
        got = call(model, inputs).to_tuple()
        assert len(got) == len(want), "output lengths differ between jaxencdec and PyTorch"
        for ours_out, theirs in zip(got, want):
            assert np.abs(np.asarray(ours_out) - theirs).max() <= 1e-5, name
        model.export_pytorch(tmp_path / name / "exported")
        reloaded = transformers.EncoderDecoderModel.from_pretrained(str(tmp_path / name / "exported")).eval()
        for ours_out, theirs in zip(got, torch_call(reloaded, inputs).to_tuple()):
            assert np.abs(np.asarray(ours_out) - theirs.numpy()).max() <= 1e-5, name
