"""transformers options that cannot change what generate returns are accepted, as transformers accepts them;
``remove_invalid_values``, which can, is implemented as transformers' ``InfNanRemoveLogitsProcessor``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp

from hf_reference import EOS, START, batch, hf_encoder_decoder
from jaxencdec import EncoderDecoderModel, GenerationConfig, GenerationConfigError
from jaxencdec.generation.processors import processor_names, remove_invalid_values

NEUTRAL = dict(use_cache=True, output_attentions=False, output_hidden_states=False, output_logits=False)


def test_remove_invalid_values_matches_transformers():
    scores = np.array([[0.5, np.nan, np.inf, -np.inf, -2.0], [np.nan, np.nan, 1.0, -np.inf, np.inf]], np.float32)
    expected = hf_lp.InfNanRemoveLogitsProcessor()(None, torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.asarray(remove_invalid_values(None, None, scores)), expected)


def test_remove_invalid_values_runs_where_transformers_runs_it():
    config = GenerationConfig(eos_token_id=EOS, decoder_start_token_id=START, forced_eos_token_id=EOS,
                              remove_invalid_values=True, do_sample=True, temperature=0.5)
    assert processor_names(config) == ("forced_eos", "remove_invalid_values", "temperature", "top_k")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_encoder_decoder("bert", "gpt2", seed=3)
    folder = tmp_path_factory.mktemp("bert2gpt2")
    hf.save_pretrained(folder)
    return hf, EncoderDecoderModel.from_pretrained(folder)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_neutral_options_give_the_ids_transformers_gives(pair, num_beams):
    hf, ours = pair
    ids, mask, _ = batch(seed=2)
    options = dict(max_new_tokens=6, num_beams=num_beams, remove_invalid_values=True, **NEUTRAL)
    with torch.no_grad():
        expected = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **options).numpy()
    got = np.asarray(ours.generate(ids, mask, **options))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, np.asarray(ours.generate(ids, mask, max_new_tokens=6, num_beams=num_beams)))
    assert np.asarray(ours.generate(ids, mask, max_new_tokens=6, num_beams=num_beams, use_cache=False)).tolist() \
        == got.tolist()  # transformers decodes without a cache then; the ids are the same


def test_asking_generate_for_logits_is_a_clear_error(pair):
    _, ours = pair
    ids, mask, _ = batch(seed=2)
    with pytest.raises(GenerationConfigError, match="output_logits"):
        ours.generate(ids, mask, max_new_tokens=2, return_dict_in_generate=True, output_logits=True)


def test_warm_start_accepts_transformers_runtime_flags(tmp_path):
    parts = {}
    for role, config in (("encoder", transformers.BertConfig), ("decoder", transformers.BertConfig)):
        folder = tmp_path / role
        transformers.BertModel(config(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)).save_pretrained(folder)
        parts[role] = str(folder)
    options = dict(encoder_use_cache=False, decoder_output_hidden_states=False, return_dict=True)
    hf = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(parts["encoder"], parts["decoder"],
                                                                          **options)
    ours = EncoderDecoderModel.from_encoder_decoder_pretrained(parts["encoder"], parts["decoder"], **options)
    assert ours.config.encoder.extra["use_cache"] is False is hf.config.encoder.use_cache
    assert ours.config.decoder.extra["output_hidden_states"] is False is hf.config.decoder.output_hidden_states
    assert ours.config.extra["return_dict"] is True
    saved = ours.save_pretrained(tmp_path / "saved")
    assert EncoderDecoderModel.from_pretrained(saved).config.encoder.extra["use_cache"] is False
    with pytest.raises(Exception, match="hidden_sizee"):  # a typo is still refused, with its close matches
        EncoderDecoderModel.from_encoder_decoder_pretrained(parts["encoder"], parts["decoder"], encoder_hidden_sizee=8)
