"""bfloat16: mixed-precision training (float32 params, bfloat16 compute) and bfloat16 inference, against float32.

The stated bounds, on the five small reference pairs (random weights drawn large, logits' std ~1.5-2):
- train loss: bfloat16 within 1% of float32 on the same batch; the whole gradient within 8% (relative L2 norm),
  cosine similarity >= 0.995 (measured: <= 0.4%, <= 3.3%, >= 0.9995);
- inference with bfloat16 params and KV cache (bert2bert, bert2gpt2, bert2bart): teacher-forced logits within
  0.15 x the logits' std of float32's (measured <= 0.09); greedy ids identical to float32's up to the first step
  where float32's own margin between its token and bfloat16's is below twice that logit error (a near tie), never
  at a clear choice.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hf_reference import COMPUTED_PAIRS, PAIRS, batch, by_pair, hf_encoder_decoder
from jaxencdec import EncoderDecoderModel
from jaxencdec.config import EncoderDecoderConfig
from jaxencdec.generation.api import make_generate_fn
from jaxencdec.models.encoder_decoder import EncoderDecoderModule, shift_tokens_right
from jaxencdec.train import step as st
from jaxencdec.train.config import OptimConfig

def _saved(name, tmp_path_factory):
    encoder, decoder, enc_hidden, dec_hidden = PAIRS[name]
    hf = hf_encoder_decoder(encoder, decoder, seed=len(name), encoder_hidden=enc_hidden, decoder_hidden=dec_hidden)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return name, hf.config, folder


@pytest.fixture(scope="module", params=by_pair(COMPUTED_PAIRS))
def saved_pair(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["bert2bert", "bert2gpt2", "bert2bart"])  # the three decoder kinds
def saved_decoder_kind(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


def _train_batch(config, seed=5):
    ids, mask, labels = batch(seed=seed)
    decoder_ids = np.asarray(shift_tokens_right(jnp.asarray(labels), config.pad_token_id,
                                                config.decoder_start_token_id))
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
            "decoder_attention_mask": np.ones_like(decoder_ids), "labels": labels}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_bfloat16_train_loss_and_gradients_within_bound_of_float32(saved_pair):
    _, hf_config, folder = saved_pair
    model = EncoderDecoderModel.from_pretrained(folder)
    train_batch = _train_batch(hf_config)
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        loss_fn = st.make_loss_fn(EncoderDecoderModule(model.config, dtype=dtype), 0.0, mesh=None,
                                  deterministic=True)
        results[dtype] = jax.value_and_grad(lambda p: (lambda s, n: s / n)(*loss_fn(p, train_batch, None)))(
            model.params)
    (loss32, grads32), (loss16, grads16) = results[jnp.float32], results[jnp.bfloat16]
    assert loss16 != loss32  # bfloat16 really ran
    assert abs(float(loss16) - float(loss32)) <= 0.01 * float(loss32)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))  # gradients of the float32 params
    g32, g16 = _flat(grads32), _flat(grads16)
    assert np.linalg.norm(g16 - g32) <= 0.08 * np.linalg.norm(g32)
    assert g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)) >= 0.995


@pytest.mark.slow
def test_bfloat16_inference_within_bound_of_float32(saved_decoder_kind):
    name, _, folder = saved_decoder_kind
    fp32 = EncoderDecoderModel.from_pretrained(folder)
    bf16 = EncoderDecoderModel.from_pretrained(folder, param_dtype=jnp.bfloat16)
    assert bf16.module.dtype == jnp.bfloat16  # the compute dtype follows the params unless given
    assert all(p.dtype == jnp.bfloat16 for p in traverse_util.flatten_dict(bf16.params).values())
    ids, mask, labels = batch(seed=1, batch_size=4)
    reference = np.asarray(fp32(ids, mask, labels=labels).logits)
    got = np.asarray(bf16(ids, mask, labels=labels).logits)
    assert got.dtype == np.float32 and not np.array_equal(got, reference)
    logit_error = np.abs(got - reference).max()
    assert logit_error <= 0.15 * reference.std(), name

    options = dict(max_new_tokens=10, eos_token_id=None)
    ids32 = np.asarray(fp32.generate(ids, mask, **options))
    ids16 = np.asarray(bf16.generate(ids, mask, **options))
    # float32's logits along bfloat16's sequence: where the two first differ, how far apart float32 held them
    along = np.asarray(fp32(ids, mask, decoder_input_ids=ids16[:, :-1]).logits)
    for row in range(len(ids16)):
        differ = np.flatnonzero(ids32[row] != ids16[row])
        if differ.size:
            t = differ[0]
            margin = along[row, t - 1, ids32[row, t]] - along[row, t - 1, ids16[row, t]]
            assert 0 <= margin < 2 * logit_error, (name, row, t, margin, logit_error)
    assert (ids32 == ids16).all(axis=1).sum() >= len(ids16) // 2, name


def test_bfloat16_generate_keeps_its_kv_cache_in_bfloat16(saved_decoder_kind):
    _, _, folder = saved_decoder_kind
    model = EncoderDecoderModel.from_pretrained(folder, param_dtype=jnp.bfloat16)
    spec = model.config.decoder_spec
    config = model.generation_config.replace(max_new_tokens=4, num_beams=2)
    fn = make_generate_fn(model.config, config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = np.ones((3, 12), np.int32)
    text = jax.jit(fn).lower(model.params, ids, np.ones_like(ids), None).as_text()
    loop_state = re.search(r"stablehlo.while\(.*\) : (.*)", text).group(1)
    # the self-attention cache: [batch, heads, beams * (max_length - 1), head_dim] per layer, keys and values
    cache = re.findall(rf"tensor<3x{spec.num_heads}x{2 * 4}x{spec.head_dim}x(bf16|f32)>", loop_state)
    assert cache == ["bf16"] * (2 * spec.num_layers), cache
    cross = re.findall(rf"tensor<3x{spec.num_heads}x12x{spec.head_dim}x(bf16|f32)>", loop_state)
    assert cross == ["bf16"] * (2 * spec.num_layers), cross


# ------------------------------------------------------------------ the regression check for the bf16 step's speed


def _bf16_train_step_hlo(pair: str) -> tuple[str, int]:
    """The lowered StableHLO of a bfloat16-compute train step (float32 params) and the decoder's vocabulary."""
    encoder, decoder, enc_hidden, dec_hidden = PAIRS[pair]
    hf_config = hf_encoder_decoder(encoder, decoder, encoder_hidden=enc_hidden, decoder_hidden=dec_hidden).config
    config = EncoderDecoderConfig.from_dict(hf_config.to_dict())
    params = EncoderDecoderModel(config).params
    optim = OptimConfig(learning_rate=1e-3, schedule="constant")
    tx = st.make_optimizer(optim, 10, params)
    state = st.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))
    module = EncoderDecoderModule(config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    train_step = st.make_train_step(module, tx, st.learning_rate_schedule(optim, 10))
    return jax.jit(train_step).lower(state, _train_batch(hf_config)).as_text(), config.decoder_spec.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["bert2bert", "bert2gpt2", "bert2bart"])
def test_bfloat16_train_step_keeps_embedding_gradients_float32_and_matmuls_bfloat16(pair):
    """The lowered bfloat16 train step (float32 params): embedding rows are gathered from the float32 tables and
    their gradients scatter-added in float32 (a bfloat16 scatter-add with many colliding rows, e.g. every token's
    type-0 row, becomes compare-and-swap loops on GPUs: the bf16 step had run 8x slower than the f32 one); every
    matmul, forward and backward, takes bfloat16 operands (the float32 results of the LM head and of attention
    scores must not pull their backward matmuls into float32); logits and softmax stay float32."""
    text, vocab = _bf16_train_step_hlo(pair)
    scatters = re.findall(r'"stablehlo.scatter".*\n\s*\^bb0\(%\w+: tensor<(bf16|f32)>', text)
    assert scatters and set(scatters) == {"f32"}, scatters
    tables = re.findall(r'"stablehlo.gather".*: \(tensor<\d+x\d+x(bf16|f32)>', text)
    assert tables and set(tables) == {"f32"}, tables
    dots = re.findall(r"stablehlo.dot_general .*: \(tensor<[\dx]+(bf16|f32)>, tensor<[\dx]+(bf16|f32)>\) -> "
                      r"tensor<([\dx]+)(bf16|f32)>", text)
    assert len(dots) > 20
    assert {(a, b) for a, b, _, _ in dots} == {("bf16", "bf16")}, sorted(set(dots))
    logits = [out for _, _, shape, out in dots if shape.endswith(f"x{vocab}x")]
    assert logits == ["f32"], logits
    softmax_max = re.findall(r"applies stablehlo.maximum across dimensions = \[3\] : \(tensor<[\dx]+(bf16|f32)>",
                             text)
    assert softmax_max and set(softmax_max) == {"f32"}, softmax_max
