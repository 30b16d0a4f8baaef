"""Packed rows (several sequences per row, T5X's segment ids and positions) compute, for each sequence, what it
computes alone in a padded row: logits, summed loss and gradients, for the tested pairs (``COMPUTED_PAIRS``: learned
absolute positions, RoBERTa's padding-based ones, GPT-2's and BART's, projected ELECTRA embeddings), relative
position scores and a tied pair, unrolled and scanned with remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hf_reference import COMPUTED_PAIRS, PAD, START, VOCAB, by_pair
from jaxencdec import EncoderDecoderModel
from jaxencdec.models import layout
from jaxencdec.models.encoder_decoder import apply_recording, stack_records, token_loss_sum
from test_layer_execution import OWN, _as, assert_relatively_close

# (source length, target length) of each sequence, and how they are packed: rows of sequence indices.
LENGTHS = [(5, 4), (7, 3), (4, 5), (2, 2)]
ROWS = [[0, 1], [2, 3]]


@pytest.fixture(scope="module", params=by_pair(COMPUTED_PAIRS))
def saved_pair(request, hf_pair):
    """(name, transformers model, its saved folder) of each pair that computes its own way."""
    return request.param, *hf_pair(request.param)


def sequences(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(source ids, labels)`` per sequence: tokens that are not PAD, labels ending in no -100."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(4, VOCAB, src), rng.integers(4, VOCAB, tgt)) for src, tgt in LENGTHS]


def decoder_inputs(labels: np.ndarray) -> np.ndarray:
    return np.concatenate([[START], labels[:-1]])


def alone(seqs) -> dict[str, np.ndarray]:
    """One sequence per row, padded at the end."""
    src_len, tgt_len = max(len(s) for s, _ in seqs), max(len(t) for _, t in seqs)
    batch = {"input_ids": np.full((len(seqs), src_len), PAD), "attention_mask": np.zeros((len(seqs), src_len), int),
             "decoder_input_ids": np.full((len(seqs), tgt_len), PAD), "labels": np.full((len(seqs), tgt_len), -100)}
    for row, (src, labels) in enumerate(seqs):
        batch["input_ids"][row, :len(src)] = src
        batch["attention_mask"][row, :len(src)] = 1
        batch["decoder_input_ids"][row, :len(labels)] = decoder_inputs(labels)
        batch["labels"][row, :len(labels)] = labels
    return batch


def packed(seqs) -> dict[str, np.ndarray]:
    """``ROWS`` of sequences each, one after the other, segment ids from 1 (0: padding), positions from 0."""
    src_len = max(sum(len(seqs[i][0]) for i in row) for row in ROWS)
    tgt_len = max(sum(len(seqs[i][1]) for i in row) for row in ROWS)
    shape = {"input_ids": src_len, "attention_mask": src_len, "encoder_segment_ids": src_len,
             "encoder_positions": src_len, "decoder_input_ids": tgt_len, "labels": tgt_len,
             "decoder_segment_ids": tgt_len, "decoder_positions": tgt_len}
    batch = {k: np.full((len(ROWS), n), {"input_ids": PAD, "decoder_input_ids": PAD, "labels": -100}.get(k, 0))
             for k, n in shape.items()}
    for r, row in enumerate(ROWS):
        at_src = at_tgt = 0
        for segment, i in enumerate(row, start=1):
            src, labels = seqs[i]
            s, t = slice(at_src, at_src + len(src)), slice(at_tgt, at_tgt + len(labels))
            batch["input_ids"][r, s], batch["attention_mask"][r, s] = src, 1
            batch["encoder_segment_ids"][r, s], batch["encoder_positions"][r, s] = segment, np.arange(len(src))
            batch["decoder_input_ids"][r, t], batch["labels"][r, t] = decoder_inputs(labels), labels
            batch["decoder_segment_ids"][r, t], batch["decoder_positions"][r, t] = segment, np.arange(len(labels))
            at_src, at_tgt = at_src + len(src), at_tgt + len(labels)
    return batch


def logits_loss_and_grads(model: EncoderDecoderModel, batch: dict[str, np.ndarray]):
    """The teacher-forced logits, the summed token loss and its gradients (unrolled layout, flat), one jitted
    program."""
    inputs = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items() if k != "labels"}

    def summed(params):
        out = model.module.apply({"params": params}, **inputs, deterministic=True)
        return token_loss_sum(out.logits, jnp.asarray(batch["labels"]))[0], out.logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(summed, has_aux=True))(model.params)
    flat = traverse_util.flatten_dict(layout.to_layout(grads, scanned=False), sep="/")
    return np.asarray(logits), float(loss), {k: np.asarray(v) for k, v in flat.items()}


def assert_packing_changes_nothing(model: EncoderDecoderModel, seed: int):
    seqs = sequences(seed)
    logits, loss, grads = logits_loss_and_grads(model, alone(seqs))
    packed_logits, packed_loss, packed_grads = logits_loss_and_grads(model, packed(seqs))
    for r, row in enumerate(ROWS):
        at = 0
        for i in row:
            n = len(seqs[i][1])
            np.testing.assert_allclose(packed_logits[r, at:at + n], logits[i, :n], atol=1e-5, rtol=0)
            at += n
    assert loss > 0
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
    assert_relatively_close(packed_grads, grads, rtol=1e-5)


def test_a_packed_sequence_computes_what_it_computes_alone(saved_pair):
    _, _, folder = saved_pair
    assert_packing_changes_nothing(EncoderDecoderModel.from_pretrained(folder), seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OWN))
@pytest.mark.parametrize("scan_layers, remat", [(False, "none"), (True, "full")])
def test_relative_and_tied_pairs_pack_the_same_way(name, scan_layers, remat):
    """Relative position scores read distances within the row, which within a sequence are its own."""
    plain = EncoderDecoderModel(OWN[name], seed=3)
    assert_packing_changes_nothing(_as(plain, scan_layers, remat), seed=12)


ATTENTION_CASES = [(name, scan_layers) for scan_layers in (False, True) for name in COMPUTED_PAIRS]


@pytest.mark.slow
@pytest.mark.parametrize("name, scan_layers", ATTENTION_CASES)
def test_no_token_attends_to_another_sequence(hf_pair, name, scan_layers):
    """On the attention probabilities themselves: encoder self-attention, decoder causal self-attention and
    cross-attention give every key outside the query's own sequence (or, causal, after it) weight 0."""
    _, folder = hf_pair(name)
    model = EncoderDecoderModel.from_pretrained(folder, scan_layers=scan_layers)
    batch = packed(sequences(14))
    inputs = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items() if k != "labels"}
    _, records = apply_recording(model.module, {"params": model.params}, **inputs, output_attentions=True)
    src, tgt = batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    allowed = {  # [rows, queries, keys]: where a query may put weight
        "encoder": src[:, :, None] == src[:, None, :],
        "decoder": (tgt[:, :, None] == tgt[:, None, :]) & np.tril(np.ones((tgt.shape[1],) * 2, bool))[None],
        "cross": tgt[:, :, None] == src[:, None, :]}
    encoder = stack_records(records, "encoder", model.config.encoder_spec)
    decoder = stack_records(records, "decoder", model.config.decoder_spec)
    spec = model.config.encoder_spec
    offsets = np.abs(np.arange(src.shape[1])[:, None] - np.arange(src.shape[1])[None, :])
    for name, layers in (("encoder", encoder["attentions"]), ("decoder", decoder["attentions"]),
                         ("cross", decoder["cross_attentions"])):
        real = (src if name == "encoder" else tgt)[:, :, None] > 0  # padded queries attend somewhere; unused
        for i, probs in enumerate(layers):  # [rows, heads, queries, keys]
            probs = np.asarray(probs)
            may = allowed[name]
            if name == "encoder" and spec.is_local(i):  # ModernBERT's sliding layers: the nearest keys only
                may = may & (offsets < spec.sliding_window)[None]
            assert (probs[np.broadcast_to((~may & real)[:, None], probs.shape)] == 0).all(), name
            assert (probs[np.broadcast_to((may & real)[:, None], probs.shape)] > 0).all(), name


def test_packed_decoding_needs_both_segment_ids_and_no_cache():
    model = EncoderDecoderModel(OWN["tied"], seed=3)
    batch = packed(sequences(13))
    inputs = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items() if k not in ("labels", "encoder_segment_ids")}
    with pytest.raises(ValueError, match="segment_ids and encoder_segment_ids"):
        model.module.apply({"params": model.params}, **inputs)
