"""Our encoder-decoders against transformers' PyTorch EncoderDecoderModel on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file

from hf_reference import PAIRS, batch, by_pair, torch_forward
from jaxencdec import EncoderDecoderModel
from jaxencdec.models.encoder_decoder import shift_tokens_right
from jaxencdec.train import step

@pytest.fixture(scope="module", params=by_pair(list(PAIRS)))
def saved_pair(request, hf_pair):
    """(name, transformers model, its saved folder) of each pair."""
    return request.param, *hf_pair(request.param)


def assert_same_outputs(ours: EncoderDecoderModel, hf, seed: int = 0):
    ids, mask, labels = batch(seed)
    logits, loss = torch_forward(hf, ids, mask, labels)
    out = ours(ids, mask, labels=labels)
    assert np.abs(logits).std() > 0.5, "reference logits are near-uniform: the comparison would prove little"
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(out.loss), loss, rtol=1e-5)


def test_logits_and_loss_match_transformers(saved_pair):
    name, hf, folder = saved_pair
    ours = EncoderDecoderModel.from_pretrained(folder)
    assert ours.config.needs_projection == (name == "bert2gpt2-proj")
    assert_same_outputs(ours, hf)


def test_explicit_decoder_inputs_and_mask_match_transformers(saved_pair):
    _, hf, folder = saved_pair
    ours = EncoderDecoderModel.from_pretrained(folder)
    ids, mask, labels = batch(seed=5)
    decoder_ids = np.where(labels == -100, 0, labels)
    decoder_mask = (labels != -100).astype(np.int64)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      decoder_input_ids=torch.tensor(decoder_ids),
                      decoder_attention_mask=torch.tensor(decoder_mask)).logits.numpy()
    got = ours(ids, mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask).logits
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_pytorch_bin_checkpoint_loads_the_same(saved_pair, tmp_path):
    _, hf, folder = saved_pair
    # transformers 5 no longer writes .bin files; this is the file transformers 4.x wrote (torch.save of the
    # state dict, tied tensors sharing storage).
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_outputs(EncoderDecoderModel.from_pretrained(tmp_path), hf, seed=1)


def test_sharded_safetensors_checkpoint_loads_the_same(saved_pair, tmp_path):
    _, hf, _ = saved_pair
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_outputs(EncoderDecoderModel.from_pretrained(tmp_path), hf, seed=2)


def _to_hf_flax_tree(state_dict: dict[str, np.ndarray]) -> dict:
    """transformers 4.x's PyTorch->Flax renaming: Linear/Conv1D weight -> kernel (transposed), embeddings ->
    embedding, norms -> scale."""
    flat = {}
    for name, tensor in state_dict.items():
        path = name.split(".")
        if path[-1] == "weight":
            module = path[-2]
            if any(k in module for k in ("embeddings", "embed_tokens", "embed_positions", "wte", "wpe")):
                path[-1], tensor = "embedding", tensor
            elif tensor.ndim == 1:
                path[-1] = "scale"
            else:
                path[-1], tensor = "kernel", tensor.T
        flat[tuple(path)] = tensor
    return traverse_util.unflatten_dict(flat)


def test_transformers_flax_msgpack_checkpoint_loads_the_same(saved_pair, tmp_path):
    from flax.serialization import msgpack_serialize

    _, hf, folder = saved_pair
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tree = _to_hf_flax_tree(load_file(str(folder / "model.safetensors")))
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    assert_same_outputs(EncoderDecoderModel.from_pretrained(tmp_path), hf, seed=3)


def test_own_msgpack_round_trip_is_bit_identical(saved_pair, tmp_path):
    _, _, folder = saved_pair
    ours = EncoderDecoderModel.from_pretrained(folder)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "flax_model.msgpack",
                                                          "generation_config.json"]
    again = EncoderDecoderModel.from_pretrained(tmp_path)
    assert again.config == ours.config
    assert again.config.to_dict() == ours.config.to_dict()
    a, b = (traverse_util.flatten_dict(m.params, sep="/") for m in (ours, again))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


def test_pytorch_export_loads_in_transformers_with_same_logits(saved_pair, tmp_path):
    _, hf, folder = saved_pair
    ours = EncoderDecoderModel.from_pretrained(folder)
    ours.export_pytorch(tmp_path)
    reloaded = transformers.EncoderDecoderModel.from_pretrained(tmp_path).eval()
    ids, mask, labels = batch(seed=4)
    logits, loss = torch_forward(reloaded, ids, mask, labels)
    out = ours(ids, mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(out.loss), loss, rtol=1e-5)
    # Every tensor transformers holds came from our export (nothing silently re-initialized).
    exported = load_file(str(tmp_path / "model.safetensors"))
    original = hf.state_dict()
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, original[name].numpy(), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_training_loss_gradients_match_transformers(saved_pair, label_smoothing):
    """The train step's loss (its own cross-entropy backward pass) differentiates as PyTorch does."""
    _, hf, folder = saved_pair
    ours = EncoderDecoderModel.from_pretrained(folder)
    ids, mask, labels = batch(seed=5)
    decoder_ids = np.asarray(shift_tokens_right(jnp.asarray(labels), hf.config.pad_token_id,
                                                hf.config.decoder_start_token_id))
    ours_batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
                  "decoder_attention_mask": np.ones_like(decoder_ids), "labels": labels}
    loss_fn = step.make_loss_fn(ours.module, label_smoothing, mesh=None, deterministic=True)

    def mean_loss(params):
        total, count = loss_fn(params, ours_batch, None)
        return total / count

    loss, grads = jax.value_and_grad(mean_loss)(ours.params)

    hf.zero_grad()
    logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                decoder_input_ids=torch.tensor(decoder_ids)).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.tensor(labels).reshape(-1), ignore_index=-100,
                                                label_smoothing=label_smoothing)
    hf_loss.backward()
    np.testing.assert_allclose(float(loss), hf_loss.item(), rtol=1e-5)
    # every name of a tied tensor (a decoder's word embeddings and its LM head's), whichever transformers lists
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters(remove_duplicate=False) if p.grad is not None}
    our_grads = EncoderDecoderModel(ours.config, grads).pytorch_state_dict()
    assert len(hf_grads) > 10
    fixed = {name for name, p in hf.named_parameters(remove_duplicate=False) if not p.requires_grad}
    for name, grad in our_grads.items():  # PyTorch leaves no gradient where the loss does not reach (the pooler)
        if name in fixed:  # Marian's sinusoidal positions: no parameter of ours, the export writes the table
            continue
        expected = hf_grads[name] if name in hf_grads else np.zeros_like(grad)
        np.testing.assert_allclose(grad, expected, atol=1e-5, rtol=1e-4, err_msg=name)


# ---------------------------------------------------------------- the real MiniLM BERT


@pytest.fixture(scope="module")
def minilm_bert2bert(minilm_path):
    torch.manual_seed(0)
    hf = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(minilm_path, minilm_path).eval()
    hf.config.decoder_start_token_id, hf.config.pad_token_id = 101, 0
    ours = EncoderDecoderModel.from_encoder_decoder_pretrained(minilm_path, minilm_path,
                                                                decoder_start_token_id=101, pad_token_id=0)
    return hf, ours


def test_minilm_warm_start_loads_every_pretrained_tensor_and_lists_the_new_ones(minilm_bert2bert):
    hf, ours = minilm_bert2bert
    new = set(ours.load_report.missing)
    assert new, "cross-attention must be reported as newly initialized"
    assert all("cross_attention" in k or "/lm_head/" in k for k in new), sorted(new)
    assert any("cross_attention" in k for k in new) and any("/lm_head/" in k for k in new)
    # The decoder (a causal LM) has no pooler, exactly as transformers reports.
    assert ours.load_report.unexpected == ["decoder: pooler.dense.bias", "decoder: pooler.dense.weight"]
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items()}
    exported = ours.pytorch_state_dict()
    compared = 0
    for name, tensor in exported.items():
        if "crossattention" in name or "cls.predictions" in name:
            continue
        np.testing.assert_array_equal(tensor, hf_state[name], err_msg=name)
        compared += 1
    assert compared > 150


def test_minilm_warm_start_logits_match_after_transformers_save(minilm_bert2bert, minilm_path, tmp_path):
    hf, _ = minilm_bert2bert
    hf.save_pretrained(tmp_path)
    ours = EncoderDecoderModel.from_pretrained(tmp_path)
    from jaxencdec import Tokenizer

    tok = Tokenizer.from_pretrained(minilm_path)
    src = tok(["Transformers convert text to vectors.", "A short one.", "JAX compiles numerical programs with XLA "
               "for accelerators."], padding="longest")
    tgt = tok(["Vectors from text.", "Short.", "XLA compiles JAX."], padding="longest")
    labels = np.where(tgt["attention_mask"] == 1, tgt["input_ids"], -100)
    logits, loss = torch_forward(hf, src["input_ids"], src["attention_mask"], labels)
    out = ours(src["input_ids"], src["attention_mask"], labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(out.loss), loss, rtol=1e-5)
    # The export round trip on real weights: transformers reloads ours with the same logits.
    ours.export_pytorch(tmp_path / "export")
    reloaded = transformers.EncoderDecoderModel.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(torch_forward(reloaded, src["input_ids"], src["attention_mask"], labels)[0],
                               np.asarray(out.logits), atol=1e-4, rtol=0)
