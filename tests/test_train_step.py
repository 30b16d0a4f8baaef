"""The train step on one device: accumulation, loss, optimizer pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import testing
from jaxencdec.config import EncoderDecoderConfig, HFConfig
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.models.encoder_decoder import cross_entropy_loss, token_loss_sum
from jaxencdec.parallel import shard
from jaxencdec.parallel.mesh import MeshConfig, make_mesh
from jaxencdec.train import step as st
from jaxencdec.train.config import OptimConfig

VOCAB = 64




@pytest.fixture(scope="module")
def setup():
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        HFConfig.from_dict(testing.tiny_bert(VOCAB, hidden=16, layers=1, heads=2)),
        HFConfig.from_dict(testing.tiny_bert(VOCAB, hidden=16, layers=1, heads=2)),
        decoder_start_token_id=2, pad_token_id=0)
    model = EncoderDecoderModel(config, seed=0)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, VOCAB, (8, 10)), "attention_mask": np.ones((8, 10)),
             "decoder_input_ids": rng.integers(5, VOCAB, (8, 5)), "decoder_attention_mask": np.ones((8, 5)),
             "labels": rng.integers(5, VOCAB, (8, 5))}
    batch = {k: v.astype(np.int32) for k, v in batch.items()}
    batch["attention_mask"][:, 7:] = 0
    # uneven target lengths: micro-batches hold different token counts, so a mean of means would be wrong
    batch["labels"][0, 1:] = -100
    batch["labels"][5, 3:] = -100
    return model, mesh, batch


def _run_step(model, mesh, batch, micro_batches, optim=OptimConfig(learning_rate=1e-3, warmup_steps=0)):
    params = jax.tree.map(jnp.asarray, model.params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    specs = shard.param_specs(model.logical_axes(), shapes, mesh)
    tx = st.make_optimizer(optim, 10, params)
    sspecs = st.state_specs(specs, st.state_shapes(params, tx))
    state = st.init_state(shard.put_sharded(model.params, mesh, specs), tx, 0, mesh, sspecs)
    fn = st.jit_train_step(st.make_train_step(model.module, tx, st.learning_rate_schedule(optim, 10),
                                              micro_batches=micro_batches, dropout=False, mesh=mesh), mesh, sspecs)
    state, metrics = fn(state, shard.global_batch(batch, mesh))
    return jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


def test_accumulating_4x2_equals_one_batch_of_8(setup):
    model, mesh, batch = setup
    p1, m1 = _run_step(model, mesh, batch, 1)
    p4, m4 = _run_step(model, mesh, batch, 4)
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-5
    assert float(m1["tokens"]) == float(m4["tokens"]) == float((batch["labels"] != -100).sum())
    assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) <= 1e-5
    flat1, flat4 = traverse_util.flatten_dict(p1), traverse_util.flatten_dict(p4)
    assert max(float(np.max(np.abs(flat1[k] - flat4[k]))) for k in flat1) <= 1e-5
    # and the step is the model's own loss: mean token cross-entropy of the teacher-forced forward
    out = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                batch["decoder_attention_mask"])
    assert abs(float(cross_entropy_loss(out.logits, batch["labels"])) - float(m1["loss"])) <= 1e-5


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_its_gradient_match_optax(smoothing):
    """The one loss (its own derivative rule) against optax's smoothed softmax cross-entropy, -100 ignored: value,
    gradient, forward mode (``jax.jvp``) and second order (a Hessian-vector product)."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 3, 11)), jnp.float32)
    labels = jnp.asarray([[1, 4, -100], [0, 10, 3]])
    valid = labels != -100

    def reference(logits):
        targets = optax.smooth_labels(jax.nn.one_hot(jnp.where(valid, labels, 0), 11), smoothing)
        return jnp.sum(optax.softmax_cross_entropy(logits, targets) * valid) / jnp.sum(valid)

    total, count = token_loss_sum(logits, labels, smoothing)
    assert float(count) == 5
    np.testing.assert_allclose(float(total / count), float(reference(logits)), rtol=1e-6)
    np.testing.assert_allclose(float(cross_entropy_loss(logits, labels, smoothing)), float(reference(logits)),
                               rtol=1e-6)
    loss = lambda x: cross_entropy_loss(x, labels, smoothing)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(logits)), np.asarray(jax.grad(reference)(logits)), atol=1e-6)
    direction = jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
    np.testing.assert_allclose(float(jax.jvp(loss, (logits,), (direction,))[1]),
                               float(jax.jvp(reference, (logits,), (direction,))[1]), rtol=1e-5)
    hvp = lambda f: jax.jvp(jax.grad(f), (logits,), (direction,))[1]  # noqa: E731
    np.testing.assert_allclose(np.asarray(hvp(loss)), np.asarray(hvp(reference)), atol=1e-6)


def test_no_weight_decay_on_biases_and_norms(setup):
    model, _, _ = setup
    mask = traverse_util.flatten_dict(st.weight_decay_mask(model.params), sep="/")
    assert mask["encoder/layers_0/mlp/wi/kernel"] and mask["decoder/embeddings/word/embedding"]
    assert not mask["encoder/layers_0/mlp/wi/bias"]
    assert not mask["encoder/layers_0/mlp_norm/scale"] and not mask["decoder/embeddings/norm/bias"]
    assert not mask["decoder/lm_head/bias"]
    no_emb = traverse_util.flatten_dict(st.weight_decay_mask(model.params, decay_embeddings=False), sep="/")
    assert not no_emb["decoder/embeddings/word/embedding"]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_warms_up_then_decays(kind):
    sched = st.learning_rate_schedule(OptimConfig(learning_rate=1.0, warmup_steps=4, schedule=kind,
                                                  end_lr_ratio=0.1), 14)
    values = [float(sched(i)) for i in range(15)]
    assert values[0] == 0 and abs(values[2] - 0.5) < 1e-6 and abs(values[4] - 1.0) < 1e-6
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert abs(values[14] - 0.1) < 1e-6


def test_gradients_are_clipped_by_global_norm():
    tx = st.make_optimizer(OptimConfig(learning_rate=1.0, max_grad_norm=1.0, weight_decay=0.0, b1=0.0, b2=0.0,
                                       eps=0.0), 10, {"w": {"kernel": jnp.zeros(2)}})
    # with b1 = b2 = 0 Adam's step is g / |g|, so look at the clipped gradient through the chain's first part
    clip = optax.clip_by_global_norm(1.0)
    g = {"w": {"kernel": jnp.asarray([30.0, 40.0])}}
    clipped, _ = clip.update(g, clip.init(g))
    assert np.allclose(np.asarray(clipped["w"]["kernel"]), [0.6, 0.8])
    assert len(tx.init({"w": {"kernel": jnp.zeros(2)}})) == 2  # clip + adamw


def test_nonfinite_loss_is_flagged(setup):
    model, mesh, batch = setup
    broken = jax.tree.map(lambda x: x, model.params)
    broken["decoder"]["lm_head"]["bias"] = jnp.full_like(broken["decoder"]["lm_head"]["bias"], jnp.nan)
    nan_model = EncoderDecoderModel(model.config, params=broken)
    _, metrics = _run_step(nan_model, mesh, batch, 1)
    assert float(metrics["finite"]) == 0.0


def test_bfloat16_compute_keeps_float32_params(setup):
    model, mesh, batch = setup
    bf16 = EncoderDecoderModel(model.config, params=model.params, dtype=jnp.bfloat16)
    p32, m32 = _run_step(model, mesh, batch, 1)
    p16, m16 = _run_step(bf16, mesh, batch, 2)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(p16))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05  # bf16 activations, same model
    assert float(m16["finite"]) == 1.0


def test_lr_multipliers_scale_each_group_step():
    params = {"encoder": {"kernel": jnp.ones(2)}, "decoder": {"cross_attention": {"kernel": jnp.ones(2)},
                                                              "frozen": {"kernel": jnp.ones(2)}}}
    grads = jax.tree.map(lambda p: jnp.asarray([0.5, -2.0]), params)

    def first_step(multipliers):
        tx = st.make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.0, max_grad_norm=0.0,
                                           lr_multipliers=multipliers), 10, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return traverse_util.flatten_dict(updates, sep="/")

    plain = first_step({})
    scaled = first_step({"cross_attention": 10.0, "frozen$|frozen/": 0.0})
    np.testing.assert_allclose(scaled["decoder/cross_attention/kernel"], 10 * plain["decoder/cross_attention/kernel"])
    np.testing.assert_allclose(scaled["encoder/kernel"], plain["encoder/kernel"])
    assert not np.any(scaled["decoder/frozen/kernel"]) and np.all(plain["decoder/frozen/kernel"])


def test_freeze_keeps_matching_params_and_skips_their_backward(setup):
    model, mesh, batch = setup
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, max_grad_norm=0.0)  # no clipping: groups independent
    frozen_optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, max_grad_norm=0.0, freeze=("^encoder/",))
    p_all, m_all = _run_step(model, mesh, batch, 1, optim)
    p_dec, m_dec = _run_step(model, mesh, batch, 1, frozen_optim)
    init = traverse_util.flatten_dict(model.params, sep="/")
    p_all, p_dec = traverse_util.flatten_dict(p_all, sep="/"), traverse_util.flatten_dict(p_dec, sep="/")
    assert float(m_all["loss"]) == pytest.approx(float(m_dec["loss"]), abs=1e-6)  # same forward
    for name, value in p_dec.items():
        if name.startswith("encoder/"):
            np.testing.assert_array_equal(value, init[name])
        else:  # AdamW without clipping updates each leaf from its own gradient alone
            np.testing.assert_allclose(value, p_all[name], atol=1e-6)
    assert any(not np.array_equal(p_all[n], init[n]) for n in init if n.startswith("encoder/"))

    # the encoder's backward is not computed at all: the compiled step does fewer flops
    params = jax.tree.map(jnp.asarray, model.params)

    def step_flops(freeze):
        frozen = st.frozen_mask(params, freeze) if freeze else None
        loss = st.make_loss_fn(model.module, 0.0, None, deterministic=True, frozen=frozen)
        grad = jax.jit(jax.grad(lambda p, b: loss(p, b, None)[0]))
        return grad.lower(params, {k: jnp.asarray(v) for k, v in batch.items()}).compile().cost_analysis()["flops"]

    assert step_flops(("^encoder/",)) < 0.8 * step_flops(())
    with pytest.raises(ValueError, match="match no parameter"):
        st.frozen_mask(params, ("^encodr/",))


def test_lr_multiplier_config_is_validated():
    from jaxencdec.train.config import RunConfigError

    with pytest.raises(RunConfigError, match="not a valid regex"):
        OptimConfig(lr_multipliers={"(": 2.0})
    with pytest.raises(RunConfigError, match="must be >= 0"):
        OptimConfig(lr_multipliers={"x": -1.0})
    with pytest.raises(RunConfigError, match="optim.freeze: '\\[' is not a valid regex"):
        OptimConfig(freeze=("[",))


def test_counter_based_dropout_keeps_one_minus_rate_independently():
    from jaxencdec.nn.layers import Dropout

    x = jnp.ones((64, 128, 96), jnp.float32)
    drop = Dropout(0.1)
    first = drop.apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    second = drop.apply({}, x, False, rngs={"dropout": jax.random.key(1)})
    keep, keep2 = np.asarray(first != 0), np.asarray(second != 0)
    assert abs(keep.mean() - 0.9) < 0.003  # 786k draws: ~9 standard deviations
    np.testing.assert_allclose(np.asarray(first)[keep], 1 / 0.9, rtol=1e-6)  # inverted dropout scaling
    assert abs((keep == keep2).mean() - (0.9 ** 2 + 0.1 ** 2)) < 0.003  # another key: an independent mask
    assert abs((keep[:, :, 1:] == keep[:, :, :-1]).mean() - 0.82) < 0.003  # neighbours independent
    per_column = keep.mean(axis=(0, 1))
    assert per_column.min() > 0.86 and per_column.max() < 0.94  # no position favoured (8192 draws each)
    np.testing.assert_array_equal(drop.apply({}, x, True), x)
