"""Our generate against transformers' PyTorch generate on the same weights: token-identical sequences, beam scores
within 1e-4.

Nine models: the real all-MiniLM-L6-v2 warm-started as bert2bert, and small random bert2gpt2, bert2bart,
xlmr2camembert, distilbert2xlmr, electra2bertgen, bertgen2electra, roberta2mbart and albert2roberta
(tests/hf_reference.py's PAIRS)
whose weights are drawn large so that logits are far from ties. The EOS ids, bad words and forced tokens are picked
from what each reference model actually generates, so that sequences really end early and the constraints really
bite (asserted below); a constraint the model never meets proves nothing.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers

from hf_reference import PAIRS, batch, hf_encoder_decoder
from jaxencdec import EncoderDecoderModel

MAX_NEW = 8

# (id, generate kwargs). Keys in EOS_KEYS are placeholders, filled per model by `resolve_case`.
CASES = [
    ("greedy", {}),
    ("beam4-lp0.6-early-true", dict(num_beams=4, length_penalty=0.6, early_stopping=True)),
    ("beam4-lp1.0-early-false", dict(num_beams=4, length_penalty=1.0, early_stopping=False)),
    ("beam4-lp2.0-never-nrs2", dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=2)),
    ("no-repeat-ngram-3", dict(no_repeat_ngram_size=3)),
    ("min-new-tokens-beam", dict(num_beams=4, min_new_tokens=5)),
    ("repetition-penalty-1.3", dict(repetition_penalty=1.3)),
    ("encoder-repetition-penalty-2", dict(encoder_repetition_penalty=2.0)),
    ("encoder-repetition-penalty-beam4", dict(num_beams=4, encoder_repetition_penalty=4.0, no_repeat_ngram_size=2)),
    ("encoder-no-repeat-ngram-2", dict(encoder_no_repeat_ngram_size=2)),
    ("encoder-no-repeat-ngram-1-beam4", dict(num_beams=4, encoder_no_repeat_ngram_size=1)),
    ("bad-words", dict(bad_words_ids="probe")),
    ("forced-eos", dict(forced_eos_token_id="probe")),
    ("eos-list", dict(eos_token_id="probe-list")),
]


def _probe_tokens(hf, ids, mask, start, pad):
    """Greedy generation without EOS: the tokens the model emits, to build meaningful constraints from."""
    with torch.no_grad():
        return hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=MAX_NEW,
                           decoder_start_token_id=start, pad_token_id=pad, eos_token_id=None,
                           forced_eos_token_id=None).numpy()


class Setup:
    """A reference model, ours on the same weights, a padded batch, and per-model token choices."""

    def __init__(self, hf, ours, ids, mask, start, pad):
        self.hf, self.ours, self.ids, self.mask = hf, ours, ids, mask
        probe = _probe_tokens(hf, ids, mask, start, pad)
        # Sources that echo what the model says first (tokens 1-3 of its greedy output), so that the encoder
        # n-gram bans really bite.
        self.echo_ids = ids.copy()
        self.echo_ids[:, 1:4] = probe[:, 1:4]
        # EOS: what input 0 emits at step 3, so that it ends early; a second id for the list case from input 2.
        self.eos = int(probe[0, 3])
        second = int(probe[2, 2])
        self.eos_list = [self.eos, second if second != self.eos else int(probe[2, 1])]
        # Bad words: a token input 1 emits first, and the two-token sequence that input 3 begins with.
        self.bad_words = [[int(probe[1, 1])], [int(probe[3, 1]), int(probe[3, 2])]]
        self.forced_eos = int(probe[1, 2])
        self.base = dict(max_new_tokens=MAX_NEW, decoder_start_token_id=start, pad_token_id=pad,
                         eos_token_id=self.eos, forced_eos_token_id=None)

    def resolve_case(self, kwargs):
        kwargs = {**self.base, **kwargs}
        for key, value in kwargs.items():
            if value == "probe":
                kwargs[key] = self.bad_words if key == "bad_words_ids" else self.forced_eos
            elif value == "probe-list":
                kwargs[key] = self.eos_list
        return kwargs


def _small(name, tmp_path_factory):
    encoder, decoder, _, _ = PAIRS[name]
    hf = hf_encoder_decoder(encoder, decoder, seed=7)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    ids, mask, _ = batch(seed=3, batch_size=4, src_len=11)
    return Setup(hf, EncoderDecoderModel.from_pretrained(folder), ids, mask, start=3, pad=0)


def _minilm(minilm_path, tmp_path_factory):
    torch.manual_seed(0)  # the cross-attention is newly initialised: fix it, then load the very same weights
    hf = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(minilm_path, minilm_path).eval()
    folder = tmp_path_factory.mktemp("minilm")
    hf.save_pretrained(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (4, 14))
    mask = np.ones_like(ids)
    ids[:, 0] = 101
    for row, length in enumerate([14, 11, 8, 5]):  # [CLS] ... [SEP], then padding
        ids[row, length - 1] = 102
        ids[row, length:] = 0
        mask[row, length:] = 0
    return Setup(hf, EncoderDecoderModel.from_pretrained(folder), ids, mask, start=101, pad=0)


MODELS = ["bert2bert-minilm", "bert2gpt2", "bert2bart", "xlmr2camembert", "distilbert2xlmr", "electra2bertgen",
          "bertgen2electra", "roberta2mbart", "albert2roberta"]  # the small ones: PAIRS
# Greedy and beam search run each decoder with its cache (beams reorder it); the logits processors and stopping
# criteria act on scores and ids alone, the same whatever the decoder: every case runs on one model.
SEARCH_CASES = {"greedy", "beam4-lp0.6-early-true", "beam4-lp1.0-early-false", "beam4-lp2.0-never-nrs2"}
EVERY_CASE_ON = "bert2gpt2"
MODEL_CASES = [(model, case_id, kwargs) for model in MODELS for case_id, kwargs in CASES
               if model == EVERY_CASE_ON or case_id in SEARCH_CASES]


@pytest.fixture(scope="module")
def setups(minilm_path, tmp_path_factory):
    """``name -> Setup`` of the models, each built once."""

    @functools.cache
    def get(name: str) -> Setup:
        return _minilm(minilm_path, tmp_path_factory) if name == "bert2bert-minilm" else _small(name, tmp_path_factory)

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model, case", [(m, kwargs) for m, _, kwargs in MODEL_CASES],
                         ids=[f"{m}-{case_id}" for m, case_id, _ in MODEL_CASES])
def test_generate_matches_transformers(setups, model, case):
    setup = setups(model)
    kwargs = setup.resolve_case(case)
    ids = setup.echo_ids if "encoder_no_repeat_ngram_size" in case else setup.ids
    with torch.no_grad():
        expected = setup.hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(setup.mask),
                                     return_dict_in_generate=True, output_scores=True, **kwargs)
    got = setup.ours.generate(ids, setup.mask, return_dict_in_generate=True, output_scores=True, **kwargs)
    want = expected.sequences.numpy()
    np.testing.assert_array_equal(np.asarray(got.sequences), want)
    if kwargs.get("num_beams", 1) > 1:
        np.testing.assert_allclose(np.asarray(got.sequences_scores), expected.sequences_scores.numpy(), atol=1e-4,
                                   rtol=0)
    else:
        assert got.sequences_scores is None
    if case.get("eos_token_id") == "probe-list":
        # Rows that end before the last possible position (MAX_NEW): at least two, or the case proves little.
        ended_early = np.isin(want[:, 1:MAX_NEW], kwargs["eos_token_id"]).any(axis=1)
        assert ended_early.sum() >= 2, "the EOS ids do not end sequences early"
    source_options = {"encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0}
    if set(case) & set(source_options):
        # The option must change what is generated, or the case proves nothing.
        plain = setup.ours.generate(ids, setup.mask, **{**kwargs, **source_options})
        assert np.asarray(plain).shape != want.shape or (np.asarray(plain) != want).any()
