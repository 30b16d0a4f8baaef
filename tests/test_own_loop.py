"""The README's "Your own training loop": the block runs as written on one device and on a data 2 x model 2 mesh
of four, the model called inside jax.jit / jax.grad / jax.vmap with labels; its loss is the one `jaxencdec train`
computes. And transformers 4's Flax summarization train and eval steps, as that example writes them, on the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import testing
from jaxencdec.train import step as steps

# The README's loop trains the real MiniLM pair: slow, like the README's other blocks.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def readme_loop() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Your own training loop", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def one_device() -> dict:
    """The README block's namespace after it ran in this process (one device)."""
    namespace: dict = {}
    exec(compile(readme_loop(), "README.md own loop", "exec"), namespace)
    return namespace


def test_the_readme_loop_trains_and_its_loss_is_the_trainers(one_device):
    losses, model, batch = one_device["losses"], one_device["model"], one_device["batch"]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses

    # without dropout, the model's loss in jit equals the train step's loss function, and so do the gradients
    params = model.params
    total_count = steps.make_loss_fn(model.module, 0.0, None, deterministic=True)
    trainer_loss = lambda p: (lambda total, count: total / count)(*total_count(p, {
        **batch, "decoder_input_ids": model._decoder_inputs_from_labels(batch["labels"]),
        "decoder_attention_mask": np.ones_like(batch["labels"])}, jax.random.key(0)))
    ours = lambda p: model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], params=p).loss
    loss, grads = jax.jit(jax.value_and_grad(ours))(params)
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(trainer_loss))(params)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(ours(params)), float(loss), rtol=1e-6)  # outside jit: the same loss
    bad = np.array(batch["input_ids"]).copy()
    bad[0, 1] = 5000
    with pytest.raises(ValueError, match="input_ids holds token id 5000 outside the vocabulary"):
        model(bad, batch["attention_mask"], labels=batch["labels"])  # outside jit the values are checked


def on_a_2x2_mesh(source: str, names: str) -> dict:
    """Runs ``source`` (whose mesh is ``MeshConfig(data=2, fsdp=1, model=2)``) in a child with four devices; returns
    the values of its global ``names`` (a Python expression of a dict), after checking the mesh it ran on."""
    source += f"\nimport json; print(json.dumps({{**{names}, 'mesh': dict(mesh.shape)}}))\n"
    proc = subprocess.run([sys.executable, "-c", source], env=testing.subprocess_env(4), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mesh"] == {"data": 2, "fsdp": 1, "model": 2}
    return result


def test_the_readme_loop_on_a_2x2_mesh_gives_the_one_device_losses(one_device):
    source = readme_loop().replace("MeshConfig(data=-1)", "MeshConfig(data=2, fsdp=1, model=2)")
    result = on_a_2x2_mesh(source, "{'losses': losses}")
    np.testing.assert_allclose(result["losses"], one_device["losses"], rtol=1e-5)


def test_encode_and_decode_run_in_jit_and_grad_as_outside(one_device):
    model, batch = one_device["model"], one_device["batch"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    decoder_ids = model._decoder_inputs_from_labels(batch["labels"])

    def logits(params, ids, mask, decoder_ids):
        return model.decode(decoder_ids, model.encode(ids, mask, params=params), mask, params=params).logits

    np.testing.assert_allclose(np.asarray(jax.jit(logits)(model.params, ids, mask, decoder_ids)),
                               np.asarray(logits(model.params, ids, mask, decoder_ids)), atol=1e-5, rtol=0)
    grads = jax.grad(lambda p: logits(p, ids, mask, decoder_ids).sum())(model.params)
    assert jax.tree.structure(grads) == jax.tree.structure(model.params)


def test_the_model_maps_over_examples_with_vmap(one_device):
    """jax.vmap over the examples of a batch (one row each, as transformers 4's Flax models allowed): the logits of
    the batched call, each row's own loss, per-example gradients, and encode / decode the same way."""
    model, batch = one_device["model"], one_device["batch"]
    ids, mask, labels = (np.asarray(batch[k])[:3] for k in ("input_ids", "attention_mask", "labels"))

    def one(params, ids, mask, labels):
        out = model(ids[None], mask[None], labels=labels[None], params=params)
        return out.logits[0], out.loss

    logits, losses = jax.vmap(one, in_axes=(None, 0, 0, 0))(model.params, ids, mask, labels)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids, mask, labels=labels).logits), atol=1e-5,
                               rtol=0)
    alone = [float(model(ids[i:i + 1], mask[i:i + 1], labels=labels[i:i + 1]).loss) for i in range(3)]
    np.testing.assert_allclose(np.asarray(losses), alone, rtol=1e-5)
    assert len(set(alone)) == 3  # three rows, three different losses: the map really is per example
    per_example = jax.vmap(jax.grad(lambda p, *row: one(p, *row)[1]), in_axes=(None, 0, 0, 0))(
        model.params, ids, mask, labels)
    first = jax.grad(lambda p: one(p, ids[0], mask[0], labels[0])[1])(model.params)
    for stacked, alone_grad in zip(jax.tree.leaves(per_example), jax.tree.leaves(first)):
        assert stacked.shape == (3, *alone_grad.shape)
        np.testing.assert_allclose(np.asarray(stacked[0]), np.asarray(alone_grad), rtol=1e-5, atol=1e-7)
    encoded = jax.vmap(lambda i, m: model.encode(i[None], m[None]).last_hidden_state[0])(ids, mask)
    np.testing.assert_allclose(np.asarray(encoded), np.asarray(model.encode(ids, mask).last_hidden_state),
                               atol=1e-5, rtol=0)


# transformers 4's Flax summarization example (examples/flax/summarization/run_summarization_flax.py) as it is
# structured: a flax TrainState with a dropout rng, the model called with **batch, params, dropout_rng and
# train=True, the label-smoothed cross entropy of optax on the logits masked by decoder_attention_mask, grads,
# state.apply_gradients; and its eval step. The script pmaps and psums over devices; here one jit runs over the
# mesh (MESH), the parameters placed by their logical partition specs.
FLAX_SUMMARIZATION_LOOP = '''
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from flax.training.common_utils import onehot

from jaxencdec import EncoderDecoderModel
from jaxencdec.config import BertConfig, EncoderDecoderConfig
from jaxencdec.models.encoder_decoder import shift_tokens_right
from jaxencdec.parallel.mesh import MeshConfig, make_mesh
from jaxencdec.parallel.shard import batch_sharding, named, param_specs


class TrainState(train_state.TrainState):
    dropout_rng: jax.Array


bert = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
    bert, bert, decoder_start_token_id=101, pad_token_id=0, eos_token_id=102), seed=0)
mesh = make_mesh(MESH)
params = jax.device_put(model.params, named(mesh, param_specs(model.logical_axes(), model.params, mesh)))
state = TrainState.create(apply_fn=model.__call__, params=params, tx=optax.adamw(1e-3, weight_decay=0.01),
                          dropout_rng=jax.random.key(0))


def loss_fn(logits, labels, padding_mask, label_smoothing_factor=0.0):
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing_factor
    low_confidence = (1.0 - confidence) / (vocab_size - 1)
    normalizing_constant = -(confidence * jnp.log(confidence)
                             + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
    soft_labels = onehot(labels, vocab_size, on_value=confidence, off_value=low_confidence)
    loss = (optax.softmax_cross_entropy(logits, soft_labels) - normalizing_constant) * padding_mask
    return loss.sum(), padding_mask.sum()


@jax.jit
def train_step(state, batch):
    dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

    def compute_loss(params):
        labels = batch.pop("labels")
        logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
        loss, num_labels = loss_fn(logits, labels, batch["decoder_attention_mask"])
        return loss / num_labels

    loss, grad = jax.value_and_grad(compute_loss)(state.params)
    return state.apply_gradients(grads=grad, dropout_rng=new_dropout_rng), loss


@jax.jit
def eval_step(params, batch):
    labels = batch.pop("labels")
    logits = model(**batch, params=params, train=False)[0]
    loss, num_labels = loss_fn(logits, labels, batch["decoder_attention_mask"])
    return loss / num_labels


rows = np.random.default_rng(0).integers(103, 1000, size=(8, 12))
labels = np.concatenate([rows[:, :6], np.full((8, 1), 102)], 1)
labels[4:, 5:] = 0  # padded targets, masked by decoder_attention_mask
batch = {"input_ids": np.concatenate([np.full((8, 1), 101), rows, np.full((8, 1), 102)], axis=1),
         "attention_mask": np.ones((8, 14)), "labels": labels,
         "decoder_input_ids": np.asarray(shift_tokens_right(labels, 0, 101)),
         "decoder_attention_mask": (np.arange(7) < np.where(np.arange(8) < 4, 7, 5)[:, None]).astype(np.int32)}
batch = jax.device_put({k: v.astype(np.int32) for k, v in batch.items()}, batch_sharding(mesh))
losses = []
for step in range(3):
    state, loss = train_step(state, dict(batch))
    losses.append(float(loss))
eval_loss = float(eval_step(state.params, dict(batch)))
'''


def _flax_summarization_loop(mesh: str) -> str:
    return FLAX_SUMMARIZATION_LOOP.replace("make_mesh(MESH)", f"make_mesh({mesh})")


def test_transformers_flax_summarization_steps_run_on_the_model():
    """Its train step runs 3 steps (the loss falls); its eval loss is the one `jaxencdec train` computes (1e-5);
    on a data 2 x model 2 mesh of four devices the losses are those of one device."""
    namespace: dict = {}
    exec(compile(_flax_summarization_loop("MeshConfig(data=-1)"), "flax summarization loop", "exec"), namespace)
    losses, state, batch, model = (namespace[k] for k in ("losses", "state", "batch", "model"))
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    ignored = {**batch, "labels": np.where(np.asarray(batch["decoder_attention_mask"]) > 0, batch["labels"], -100)}
    total, count = jax.jit(steps.make_loss_fn(model.module, 0.0, None, deterministic=True))(
        state.params, ignored, jax.random.key(0))  # the trainer's labels: -100 where the script masks
    np.testing.assert_allclose(namespace["eval_loss"], float(total / count), rtol=1e-5)
    assert int(count) == 8 * 7 - 4 * 2  # the padded targets are not counted

    result = on_a_2x2_mesh(_flax_summarization_loop("MeshConfig(data=2, fsdp=1, model=2)"),
                           "{'losses': losses, 'eval': eval_loss}")
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(result["eval"], namespace["eval_loss"], rtol=1e-5)
