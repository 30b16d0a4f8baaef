"""The README's "Your own training loop": the block runs as written on one device and on a data 2 x model 2 mesh
of four, the model called inside jax.jit / jax.grad / jax.vmap with labels; its loss is the one `jaxencdec train`
computes."""

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


def test_the_readme_loop_on_a_2x2_mesh_gives_the_one_device_losses(one_device):
    source = readme_loop().replace("MeshConfig(data=-1)", "MeshConfig(data=2, fsdp=1, model=2)")
    source += "\nimport json; print(json.dumps({'losses': losses, 'mesh': dict(mesh.shape)}))\n"
    proc = subprocess.run([sys.executable, "-c", source], env=testing.subprocess_env(4), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mesh"] == {"data": 2, "fsdp": 1, "model": 2}
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
