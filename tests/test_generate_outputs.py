"""What ``generate(..., return_dict_in_generate=True)`` returns besides the ids: encoder attentions and hidden states,
and per decoder step the self-attention, cross-attention and hidden states, against transformers' PyTorch generate
on the same weights (the five model pairs): the same nesting, shapes and values, for greedy search and beam search;
sampling against transformers' teacher-forced forward pass on the sampled tokens.

The batch has sources of different lengths (padding that our search extends to a 32-token bucket, three inputs run
as a bucket of eight rows), and an EOS id that ends input 0 early, so that rows keep running after their end."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

from hf_reference import PAD, PAIRS, START, batch, by_pair
from jaxencdec import GenerationConfigError
from jaxencdec.generation import api
from test_generation_equivalence import _probe_tokens
from test_surface import RECORDED, _load_pair

MAX_NEW = 5
OUTPUTS = dict(return_dict_in_generate=True, output_attentions=True, output_hidden_states=True)
DECODER_STEPS = ("decoder_attentions", "cross_attentions", "decoder_hidden_states")


def _setup(name: str, hf_pair):
    """(transformers model, ours, ids, mask, options): ``eos_token_id`` is the token input 0 emits second, so that
    it ends while the others go on."""
    _, hf, ours = _load_pair(name, hf_pair)
    ids, mask, _ = batch(seed=4)
    probe = _probe_tokens(hf, ids, mask, START, PAD)
    options = dict(max_new_tokens=MAX_NEW, decoder_start_token_id=START, pad_token_id=PAD,
                   eos_token_id=int(probe[0, 2]))
    return hf, ours, ids, mask, options


@pytest.fixture(scope="module", params=by_pair(list(PAIRS)))
def pair(request, hf_pair):
    return _setup(request.param, hf_pair)


@pytest.fixture(scope="module")
def one_pair(hf_pair):
    """For checks that one pair suffices for: bert2gpt2 with enc_to_dec_proj."""
    return _setup("bert2gpt2-proj", hf_pair)


def _hf_generate(hf, ids, mask, **options):
    with torch.no_grad():
        return hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **options)


def _leaves(nested, path=()):
    """``(path, array)`` for every array of a nest of tuples."""
    if isinstance(nested, (tuple, list)):
        for i, item in enumerate(nested):
            yield from _leaves(item, path + (i,))
    else:
        yield path, nested


def _assert_same_structure(got, expected, fields=RECORDED):
    """The same nesting (steps, layers) and shapes in every field."""
    for field in fields:
        mine, theirs = list(_leaves(getattr(got, field))), list(_leaves(getattr(expected, field)))
        assert len(mine) > 0, field
        assert [path for path, _ in mine] == [path for path, _ in theirs], field
        for (path, a), (_, b) in zip(mine, theirs):
            assert a.shape == tuple(b.shape), (field, path)


def _real_queries(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The rows of an encoder record (states ``[batch, length, D]`` or probabilities ``[batch, heads, queries,
    keys]``) at real (unpadded) query positions."""
    return array[mask == 1] if array.ndim == 3 else array.transpose(0, 2, 1, 3)[mask == 1]


def _assert_same_records(got, expected, fields=RECORDED, padded_queries_differ=None):
    """Same structure, and every array equal: probabilities to 1e-5; hidden states to 1e-5 of their largest value
    (as tests/test_surface.py: GPT-2's residual stream reaches ~20, where float32 sums differ in the 6th digit).

    ``padded_queries_differ``: the source mask, where the encoder's sliding-window layers leave some padded queries
    no key to attend to: transformers' states there depend on its attention implementation, ours are the uniform
    average, and neither is read by anything; such encoder records are compared at real positions only."""
    _assert_same_structure(got, expected, fields)
    for field in fields:
        for (path, a), (_, b) in zip(_leaves(getattr(got, field)), _leaves(getattr(expected, field))):
            b = b.numpy() if isinstance(b, torch.Tensor) else b
            if padded_queries_differ is not None and field.startswith("encoder"):
                a, b = _real_queries(np.asarray(a), padded_queries_differ), _real_queries(b, padded_queries_differ)
            scale = max(1.0, float(np.abs(b).max())) if "hidden" in field else 1.0
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-5 * scale, rtol=0, err_msg=f"{field}{path}")


@pytest.mark.slow
@pytest.mark.parametrize("search", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"])
def test_generate_returns_the_attentions_and_hidden_states_transformers_returns(pair, search):
    hf, ours, ids, mask, options = pair
    expected = _hf_generate(hf, ids, mask, **options, **search, **OUTPUTS)
    got = ours.generate(ids, mask, **options, **search, **OUTPUTS)
    sequences = np.asarray(got.sequences)
    np.testing.assert_array_equal(sequences, expected.sequences.numpy())
    _assert_same_records(got, expected,
                         padded_queries_differ=mask if ours.config.encoder_spec.has_local_layers else None)
    if not search:  # input 0 ended before the last step, and the loop went on: its finished row is recorded too
        assert options["eos_token_id"] in sequences[0, 1:-1]
    rows = len(ids) * search.get("num_beams", 1)
    assert got.decoder_attentions[-1][0].shape[0] == rows and got.encoder_attentions[0].shape[0] == len(ids)


def _teacher_forced(hf, ids, mask, sequences, copies):
    """transformers' forward pass on ``sequences`` (the sources repeated ``copies`` times), with everything
    recorded, rearranged as generate returns it: per step ``t``, query ``t`` over keys ``0..t``."""
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(np.repeat(ids, copies, axis=0)),
                 attention_mask=torch.tensor(np.repeat(mask, copies, axis=0)),
                 decoder_input_ids=torch.tensor(sequences[:, :-1]), output_attentions=True, output_hidden_states=True)
    steps = range(sequences.shape[1] - 1)
    return dict(
        encoder_attentions=tuple(a[::copies] for a in out.encoder_attentions),
        encoder_hidden_states=tuple(h[::copies] for h in out.encoder_hidden_states),
        decoder_attentions=tuple(tuple(a[:, :, t:t + 1, :t + 1] for a in out.decoder_attentions) for t in steps),
        cross_attentions=tuple(tuple(a[:, :, t:t + 1] for a in out.cross_attentions) for t in steps),
        decoder_hidden_states=tuple(tuple(h[:, t:t + 1] for h in out.decoder_hidden_states) for t in steps))


def test_sampling_records_what_each_step_computed(one_pair):
    """Without an EOS id every sampled token is fed back: transformers' teacher-forced pass on the sampled sequences
    computes what each step did. Structure as transformers' own sampling; beam sampling's structure too (beam
    sampling records through beam search's code, checked value by value above)."""
    hf, ours, ids, mask, options = one_pair
    options = {**options, "eos_token_id": None}
    sampling = dict(do_sample=True, num_return_sequences=2)
    got = ours.generate(ids, mask, **options, **sampling, **OUTPUTS, prng_key=jax.random.key(0))
    sequences = np.asarray(got.sequences)
    assert sequences.shape == (2 * len(ids), 1 + MAX_NEW)
    _assert_same_structure(got, _hf_generate(hf, ids, mask, **options, **sampling, **OUTPUTS))
    _assert_same_records(got, SimpleNamespace(**_teacher_forced(hf, ids, mask, sequences, copies=2)))

    beam_sampling = dict(do_sample=True, num_beams=2)
    got = ours.generate(ids, mask, **options, **beam_sampling, **OUTPUTS, prng_key=jax.random.key(0))
    _assert_same_structure(got, _hf_generate(hf, ids, mask, **options, **beam_sampling, **OUTPUTS))


def test_only_what_is_asked_for_is_returned(one_pair):
    _, ours, ids, mask, options = one_pair
    plain = ours.generate(ids, mask, **options)
    attentions = ours.generate(ids, mask, **options, return_dict_in_generate=True, output_attentions=True)
    np.testing.assert_array_equal(np.asarray(attentions.sequences), np.asarray(plain))
    assert attentions.encoder_hidden_states is None and attentions.decoder_hidden_states is None
    assert attentions.cross_attentions[0][0].shape[-1] == ids.shape[1]  # the source bucket's padding is cut off
    traces = api.trace_count()
    states = ours.generate(ids, mask, **options, return_dict_in_generate=True, output_hidden_states=True)
    assert states.encoder_attentions is None and states.decoder_attentions is None
    assert len(states.decoder_hidden_states[0]) == ours.config.decoder_spec.num_layers + 1
    assert api.trace_count() == traces + 1  # recording is compiled in; each choice once
    again = ours.generate(ids[::-1].copy(), mask[::-1].copy(), **options, return_dict_in_generate=True,
                          output_hidden_states=True)
    assert api.trace_count() == traces + 1 and len(again.encoder_hidden_states) == len(states.encoder_hidden_states)
    # Without return_dict_in_generate the flags do nothing (transformers warns and returns the ids).
    ids_only = ours.generate(ids, mask, **options, output_attentions=True, output_hidden_states=True)
    np.testing.assert_array_equal(np.asarray(ids_only), np.asarray(plain))


def test_make_generate_fn_refuses_to_record(one_pair):
    _, ours, _, _, options = one_pair
    config = ours.generation_config.replace(**options, **OUTPUTS)
    with pytest.raises(GenerationConfigError, match="output_attentions"):
        api.make_generate_fn(ours.config, config)
