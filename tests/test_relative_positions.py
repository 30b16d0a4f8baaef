"""Relative position embeddings (``position_embedding_type="relative_key"`` / ``"relative_key_query"``) and a
tied encoder-decoder, against transformers 4.57, which transformers 5 no longer matches (it removed both).

One transformers 4 script builds small BERT and RoBERTa pairs with relative positions in the encoder and in the
decoder, saves them, and records their logits, attentions, gradients and generated ids; we load each checkpoint
and compare every path: the forward pass, its gradients, ``encode`` / ``decode`` with a cache, greedy and beam
generation on a padded batch. A tied relative bert2bert is trained here, exported, and reloaded by a second
transformers 4 script, which must find it tied and give our logits.

transformers 4.57's teacher-forced forward with its default ``use_cache=True`` places every decoder query at the
last position (it only agrees at ``q_len == 1``, i.e. in generation); its references here use ``use_cache=False``,
where each query sits at its own position, as in its generation and ours (``test_cached_decoding_matches``
shows the difference).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from hf_reference import EOS, PAD, START, batch
from jaxencdec import EncoderDecoderModel
from jaxencdec.config import BertConfig, ConfigError, EncoderDecoderConfig
from jaxencdec.models.encoder_decoder import shift_tokens_right
from jaxencdec.train import step as st
from transformers4 import transformers4  # noqa: F401 (a fixture)

# name: (architecture, encoder position_embedding_type, decoder position_embedding_type, seed). Between them,
# each architecture has each relative type as encoder and as decoder.
PAIRS = {
    "bert-key-keyquery": ("bert", "relative_key", "relative_key_query", 11),
    "bert-keyquery-key": ("bert", "relative_key_query", "relative_key", 12),
    "roberta-key": ("roberta", "relative_key", "relative_key", 13),
    "roberta-keyquery": ("roberta", "relative_key_query", "relative_key_query", 14),
}
# Checks whose code does not depend on the architecture run on fewer pairs that still cover both relative types
# in both roles: the BERT pairs; the pairs with a relative_key_query decoder, and those with a relative_key one.
BERT_PAIRS = [name for name, (arch, *_) in PAIRS.items() if arch == "bert"]
KEY_QUERY_DECODERS = [name for name, (_, _, decoder, _) in PAIRS.items() if decoder == "relative_key_query"]
KEY_DECODERS = [name for name in PAIRS if name not in KEY_QUERY_DECODERS]
GENERATE = dict(max_new_tokens=8, decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS)
BEAMS = dict(num_beams=4, num_return_sequences=2, length_penalty=0.6)
LEARNING_RATE, TRAIN_STEPS = 0.5, 3
FORWARD = batch(seed=0)  # ids, mask, labels: sources of different lengths, labels ending in -100
GENERATION = batch(seed=3, batch_size=4, src_len=11)[:2]
TRAIN = batch(seed=6)

REFERENCE_SCRIPT = """
import json

import numpy as np
import torch
import transformers

from hf_reference import EOS, PAD, START, SMALL, randomize_

PAIRS, GENERATE, BEAMS, LEARNING_RATE, TRAIN_STEPS = json.loads(open("settings.json").read())
t = {name: torch.tensor(array) for name, array in np.load("inputs.npz").items()}
out = {}


def build(arch, encoder_type, decoder_type, seed, **kwargs):
    parts = [SMALL[arch]() for _ in range(2)]
    for part, kind in zip(parts, (encoder_type, decoder_type)):
        part.position_embedding_type = kind
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(*parts, **kwargs)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = START, PAD, EOS
    torch.manual_seed(seed)
    return randomize_(transformers.EncoderDecoderModel(config=config), seed)


def forward(model, **kwargs):
    return model(input_ids=t["ids"], attention_mask=t["mask"], labels=t["labels"], **kwargs)


for name, (arch, encoder_type, decoder_type, seed) in PAIRS.items():
    model = build(arch, encoder_type, decoder_type, seed)
    model.save_pretrained(name)
    with torch.no_grad():
        result = forward(model, use_cache=False, output_attentions=True)
        out[f"{name}|logits"], out[f"{name}|loss"] = result.logits.numpy(), result.loss.numpy()
        for field in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
            out[f"{name}|{field}"] = torch.stack(getattr(result, field)).numpy()
        out[f"{name}|logits_use_cache"] = forward(model).logits.numpy()
        sources = dict(input_ids=t["gen_ids"], attention_mask=t["gen_mask"])
        out[f"{name}|greedy"] = model.generate(**sources, **GENERATE).numpy()
        beams = model.generate(**sources, **GENERATE, **BEAMS, return_dict_in_generate=True, output_scores=True)
        out[f"{name}|beams"], out[f"{name}|beam_scores"] = beams.sequences.numpy(), beams.sequences_scores.numpy()
    model.zero_grad()
    forward(model, use_cache=False).loss.backward()
    out.update({f"{name}|grad|{p}": v.grad.numpy() for p, v in model.named_parameters() if v.grad is not None})

# A tied relative bert2bert (transformers 4 ties at construction), saved as transformers 4 saves it, then
# trained by SGD as the test trains it.
model = build("bert", "relative_key_query", "relative_key_query", 21, tie_encoder_decoder=True)
assert model.encoder.embeddings.word_embeddings.weight is model.decoder.bert.embeddings.word_embeddings.weight
model.save_pretrained("tied")
with torch.no_grad():
    out["tied|logits"] = forward(model, use_cache=False).logits.numpy()
optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
losses = []
for _ in range(TRAIN_STEPS):
    optimizer.zero_grad()
    logits = model(input_ids=t["train_ids"], attention_mask=t["train_mask"],
                   decoder_input_ids=t["train_decoder_ids"], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t["train_labels"].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
out["tied|train_losses"] = np.array(losses)
with torch.no_grad():
    out["tied|trained_logits"] = forward(model, use_cache=False).logits.numpy()
np.savez("outputs.npz", **out)
"""

RELOAD_SCRIPT = """
import json

import numpy as np
import torch
import transformers

GENERATE, BEAMS = json.loads(open("settings.json").read())
t = {name: torch.tensor(array) for name, array in np.load("inputs.npz").items()}
model, info = transformers.EncoderDecoderModel.from_pretrained("export", output_loading_info=True)
model.eval()
encoder, decoder = model.encoder, model.decoder.bert
named = [("embeddings.word_embeddings.weight",) * 2, ("encoder.layer.0.attention.self.distance_embedding.weight",) * 2,
         ("encoder.layer.1.output.dense.weight",) * 2]
encoder_params, decoder_params = dict(encoder.named_parameters()), dict(decoder.named_parameters())
shared = {id(p) for p in encoder.parameters()} & {id(p) for p in decoder.parameters()}
with torch.no_grad():
    logits = model(input_ids=t["ids"], attention_mask=t["mask"], labels=t["labels"], use_cache=False).logits
    beams = model.generate(input_ids=t["gen_ids"], attention_mask=t["gen_mask"], **GENERATE, **BEAMS)
np.savez("outputs.npz", tie_encoder_decoder=model.config.tie_encoder_decoder,
         same_tensor=[encoder_params[e] is decoder_params[d] for e, d in named],
         same_storage=[encoder_params[e].data_ptr() == decoder_params[d].data_ptr() for e, d in named],
         shared=len(shared), encoder_tensors=len(encoder_params), missing=len(info["missing_keys"]),
         unexpected=len(info["unexpected_keys"]), logits=logits.numpy(), beams=beams.numpy())
"""


def _inputs() -> dict[str, np.ndarray]:
    ids, mask, labels = FORWARD
    train_ids, train_mask, train_labels = TRAIN
    train_decoder_ids = np.asarray(shift_tokens_right(jnp.asarray(train_labels), PAD, START))
    return dict(ids=ids, mask=mask, labels=labels, gen_ids=GENERATION[0], gen_mask=GENERATION[1],
                train_ids=train_ids, train_mask=train_mask, train_labels=train_labels,
                train_decoder_ids=train_decoder_ids)


@pytest.fixture(scope="module")
def reference(transformers4, tmp_path_factory):  # noqa: F811 (the fixture)
    """(folder of the saved transformers 4 models, their recorded outputs by ``"name|output"``)."""
    folder = tmp_path_factory.mktemp("relative")
    (folder / "settings.json").write_text(json.dumps([PAIRS, GENERATE, BEAMS, LEARNING_RATE, TRAIN_STEPS]))
    return folder, transformers4.run(REFERENCE_SCRIPT, folder, **_inputs())


def _outputs_of(outputs: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {key.split("|", 1)[1]: value for key, value in outputs.items() if key.startswith(name + "|")}


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, reference):
    """(name, our model loaded from transformers 4's checkpoint, that model's recorded outputs)."""
    (folder, outputs), name = reference, request.param
    return name, EncoderDecoderModel.from_pretrained(folder / name), _outputs_of(outputs, name)


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
    decoder_ids = np.asarray(shift_tokens_right(jnp.asarray(labels), PAD, START))
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
    decoder_ids = np.asarray(shift_tokens_right(jnp.asarray(labels), PAD, START))
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


def test_tied_bert2bert_trains_and_reloads_tied_in_transformers_4(reference, transformers4, tmp_path):  # noqa: F811
    """A tied relative bert2bert saved by transformers 4 loads with its shared tensors stored once; three SGD
    steps here equal transformers 4's (each shared tensor, distance tables included, gets the sum of both uses'
    gradients); saved and reloaded it is unchanged; exported, transformers 4 loads it tied and gives our logits
    and beams."""
    folder, outputs = reference
    expected = _outputs_of(outputs, "tied")
    ours = EncoderDecoderModel.from_pretrained(folder / "tied")
    assert ours.config.tie_encoder_decoder
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    paths = set(traverse_util.flatten_dict(ours.params, sep="/"))
    assert "encoder/layers_0/self_attention/distance/embedding" in paths
    assert not any(p.startswith(("decoder/embeddings", "decoder/layers_0/self_attention/")) for p in paths)
    ids, mask, labels = FORWARD
    np.testing.assert_allclose(np.asarray(ours(ids, mask, labels=labels).logits), expected["logits"], atol=1e-4,
                               rtol=0)

    train_ids, train_mask, train_labels = TRAIN
    train_decoder_ids = np.asarray(shift_tokens_right(jnp.asarray(train_labels), PAD, START))
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

    ours.export_pytorch(tmp_path / "export")
    (tmp_path / "settings.json").write_text(json.dumps([GENERATE, BEAMS]))
    got = transformers4.run(RELOAD_SCRIPT, tmp_path, **_inputs())
    assert got["tie_encoder_decoder"] and got["same_tensor"].all() and got["same_storage"].all()
    assert got["missing"] == 0 and got["unexpected"] == 0
    assert got["shared"] == got["encoder_tensors"] - 2  # every encoder tensor but the pooler's weight and bias
    np.testing.assert_allclose(got["logits"], trained, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(ours.generate(*GENERATION, **GENERATE, **BEAMS)), got["beams"])


def test_tying_stacks_with_different_position_schemes_is_a_config_error():
    """transformers 4 would tie all but the distance tables; a half-tied pair is refused here instead."""
    parts = [BertConfig(position_embedding_type="relative_key"), BertConfig()]
    with pytest.raises(ConfigError, match="position schemes must agree; encoder vs decoder: relative_attention key vs "
                                          "None"):
        EncoderDecoderConfig.from_encoder_decoder_configs(*parts, tie_encoder_decoder=True)
