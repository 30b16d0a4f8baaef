"""Warm starts from standalone Hugging Face checkpoints of each architecture (as saved by transformers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from hf_reference import SMALL, batch, hf_encoder_decoder, randomize_
from jaxencdec import EncoderDecoderModel

# name -> (architecture, transformers class saved as the standalone checkpoint)
ENCODERS = {
    "bert": ("bert", transformers.BertModel),
    "roberta-mlm": ("roberta", transformers.RobertaForMaskedLM),  # base model under "roberta.", an LM head to ignore
    "bart": ("bart", transformers.BartModel),  # the encoder half of a full BART
    "mbart": ("mbart", transformers.MBartModel),
    "marian": ("marian", transformers.MarianModel),  # sinusoidal positions, no embedding norm
    "electra": ("electra", transformers.ElectraModel),
    "bert-generation": ("bert-generation", transformers.BertGenerationEncoder),
    "albert-mlm": ("albert", transformers.AlbertForMaskedLM),  # base model under "albert.", an MLM head to ignore
    "modernbert-mlm": ("modernbert", transformers.ModernBertForMaskedLM),  # base model under "model."
}
DECODERS = {
    "bert-base": ("bert", transformers.BertModel),  # a base checkpoint: the LM head is new
    "gpt2": ("gpt2", transformers.GPT2LMHeadModel),
    "bart-causal": ("bart", transformers.BartForCausalLM),
    "bart-seq2seq": ("bart", transformers.BartForConditionalGeneration),  # BART's decoder half, shared embeddings
    "mbart-causal": ("mbart", transformers.MBartForCausalLM),
    "marian-causal": ("marian", transformers.MarianForCausalLM),
    "electra-causal": ("electra", transformers.ElectraForCausalLM),
    "bert-generation": ("bert-generation", transformers.BertGenerationDecoder),
}


def _save(tmp_path_factory, name, arch, cls):
    model = randomize_(cls(SMALL[arch]()), seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    return _save(tmp_path_factory, "bert", *ENCODERS["bert"])[1]


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    return _save(tmp_path_factory, "gpt2", *DECODERS["gpt2"])[1]


def _reference_encoder(name, model):
    if name in ("bart", "mbart", "marian"):
        return model.get_encoder()
    return {"roberta-mlm": getattr(model, "roberta", None), "albert-mlm": getattr(model, "albert", None),
            "modernbert-mlm": getattr(model, "model", None)}.get(name, model)


@pytest.mark.parametrize("enc_name", list(ENCODERS))
def test_encoder_states_match_the_standalone_encoder(enc_name, gpt2_checkpoint, tmp_path_factory):
    enc_model, enc_folder = _save(tmp_path_factory, enc_name, *ENCODERS[enc_name])
    ours = EncoderDecoderModel.from_encoder_decoder_pretrained(enc_folder, gpt2_checkpoint, decoder_start_token_id=3,
                                                                pad_token_id=1)
    assert not [k for k in ours.load_report.missing if k.startswith("encoder/") and "pooler" not in k]
    ids, mask, _ = batch()
    ids = np.where(mask == 1, ids, 1)
    with torch.no_grad():
        expected = _reference_encoder(enc_name, enc_model)(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = np.asarray(ours.module.apply({"params": ours.params}, ids, mask, method="encode"))
    if enc_name == "modernbert-mlm":  # transformers' ModernBERT masks padded queries too: their states differ
        got, expected = got[mask == 1], expected[mask == 1]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dec_name", list(DECODERS))
def test_decoder_tensors_come_from_the_checkpoint(dec_name, bert_checkpoint, tmp_path_factory):
    dec_model, dec_folder = _save(tmp_path_factory, dec_name, *DECODERS[dec_name])
    ours = EncoderDecoderModel.from_encoder_decoder_pretrained(bert_checkpoint, dec_folder, decoder_start_token_id=3,
                                                                pad_token_id=1)
    new = set(ours.load_report.missing)
    bart = DECODERS[dec_name][0] in ("bart", "mbart", "marian")  # the BART family
    assert any("cross_attention" in k for k in new) or bart
    if bart:
        assert not [k for k in new if k.startswith("decoder/")]  # BART decoders carry cross-attention already
    if dec_name == "bert-base":
        assert {"decoder/lm_head/bias", "decoder/lm_head/transform/kernel"} <= new
    # Every decoder tensor that is not new equals the checkpoint's, through our export's names.
    reference = {k: v.numpy() for k, v in dec_model.state_dict().items()}
    exported = ours.pytorch_state_dict()
    compared = 0
    for name, tensor in exported.items():
        if not name.startswith("decoder.") or "cross" in name or "cls.predictions" in name:
            continue
        local = name[len("decoder."):]
        if dec_name == "bert-base":
            local = local[len("bert."):]
        np.testing.assert_array_equal(tensor, reference[local], err_msg=name)
        compared += 1
    assert compared >= 10


def test_new_and_unused_parameters_are_listed_in_one_message_each(bert_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="jaxencdec"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(bert_checkpoint, bert_checkpoint,
                                                            decoder_start_token_id=3, pad_token_id=0)
    new, unused = [r.getMessage() for r in caplog.records]
    assert new.startswith("Newly initialized parameters")
    assert "decoder/layers_{0,1}/cross_attention/query/kernel" in new and "decoder/lm_head/bias" in new
    assert unused == "Checkpoint tensors not used by the model: decoder: pooler.dense.bias, " \
                     "decoder: pooler.dense.weight"


@pytest.mark.parametrize("arch", ["bart", "mbart"])
def test_a_bart_encoder_saved_by_transformers_reads_its_shared_word_table(arch, tmp_path):
    """transformers' EncoderDecoderModel holds a BART-family encoder as the whole BartModel (whose forward cannot
    run there: it returns a seq2seq output) and saves its tied word table once, as ``encoder.shared.weight``."""
    hf = hf_encoder_decoder(arch, "gpt2", seed=2)
    hf.save_pretrained(tmp_path)
    ours = EncoderDecoderModel.from_pretrained(tmp_path)
    assert ours.load_report.missing == [] and ours.load_report.mismatched == []
    assert all(name.startswith("encoder.decoder.") for name in ours.load_report.unexpected)  # BartModel's other half
    ids, mask, _ = batch()
    ids = np.where(mask == 1, ids, 1)
    with torch.no_grad():
        expected = hf.encoder.get_encoder()(input_ids=torch.tensor(ids),
                                            attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = ours.module.apply({"params": ours.params}, ids, mask, method="encode")
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_new_parameters_hold_what_a_fresh_model_of_the_seed_holds(bert_checkpoint, gpt2_checkpoint):
    """A warm start initializes only what the checkpoints lack: those values are a fresh model's of the same
    seed (and another seed gives others), the rest the checkpoints'."""
    from flax import traverse_util

    ours = EncoderDecoderModel.from_encoder_decoder_pretrained(bert_checkpoint, gpt2_checkpoint, seed=3,
                                                                decoder_start_token_id=3, pad_token_id=1)
    fresh = traverse_util.flatten_dict(EncoderDecoderModel(ours.config, seed=3).params, sep="/")
    other = traverse_util.flatten_dict(EncoderDecoderModel(ours.config, seed=4).params, sep="/")
    got = traverse_util.flatten_dict(ours.params, sep="/")
    new = set(ours.load_report.missing)
    assert got.keys() == fresh.keys() and any("cross_attention/query/kernel" in k for k in new)
    for k in got:
        assert got[k].shape == fresh[k].shape and got[k].dtype == fresh[k].dtype, k
        if k in new:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(fresh[k]), err_msg=k)
    assert not np.array_equal(np.asarray(got["decoder/layers_0/cross_attention/query/kernel"]),
                              np.asarray(other["decoder/layers_0/cross_attention/query/kernel"]))
    assert not np.array_equal(np.asarray(got["encoder/layers_0/mlp/wi/kernel"]),
                              np.asarray(fresh["encoder/layers_0/mlp/wi/kernel"]))  # from the checkpoint
    # Another seed: the same program (one per config and missing paths, the seed traced), the other seed's values
    from jaxencdec.loading import _init_paths

    compiled = _init_paths._cache_size()
    again = EncoderDecoderModel.from_encoder_decoder_pretrained(bert_checkpoint, gpt2_checkpoint, seed=4,
                                                                 decoder_start_token_id=3, pad_token_id=1)
    assert _init_paths._cache_size() == compiled
    again = traverse_util.flatten_dict(again.params, sep="/")
    for k in new:
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(other[k]), err_msg=k)
