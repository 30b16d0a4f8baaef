"""Bad checkpoints and bad inputs: each gives a clear error that names the problem."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_reference import VOCAB, batch, hf_encoder_decoder
from jaxencdec import CheckpointError, ConfigError, EncoderDecoderModel


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert2gpt2")
    hf_encoder_decoder("bert", "gpt2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(hf_folder):
    return EncoderDecoderModel.from_pretrained(hf_folder)


def _copy_with_state(src, dst, state):
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(hf_folder, tmp_path):
    state = load_file(str(hf_folder / "model.safetensors"))
    del state["decoder.transformer.h.1.crossattention.q_attn.weight"]
    _copy_with_state(hf_folder, tmp_path, state)
    with pytest.raises(CheckpointError, match=r"missing.*decoder/layers_1/cross_attention/query/kernel"):
        EncoderDecoderModel.from_pretrained(tmp_path)


def test_shape_mismatch_lists_name_and_shapes(hf_folder, tmp_path):
    state = load_file(str(hf_folder / "model.safetensors"))
    state["encoder.embeddings.word_embeddings.weight"] = np.zeros((VOCAB + 5, 32), np.float32)
    _copy_with_state(hf_folder, tmp_path, state)
    with pytest.raises(CheckpointError, match=r"encoder\.embeddings\.word_embeddings\.weight \(125, 32\) vs "
                                              r"expected \(120, 32\)"):
        EncoderDecoderModel.from_pretrained(tmp_path)


def test_truncated_safetensors(hf_folder, tmp_path):
    data = (hf_folder / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|corrupt)"):
        EncoderDecoderModel.from_pretrained(tmp_path)


def test_corrupt_own_msgpack(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    weights = tmp_path / "flax_model.msgpack"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="flax_model.msgpack"):
        EncoderDecoderModel.from_pretrained(tmp_path)


def test_truncated_config_json(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:50])
    with pytest.raises(CheckpointError, match=r"config\.json.*invalid JSON"):
        EncoderDecoderModel.from_pretrained(tmp_path)


def test_missing_weights_file(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    os.remove(tmp_path / "flax_model.msgpack")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        EncoderDecoderModel.from_pretrained(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(hf_folder, tmp_path):
    payload = _RunsCode()
    payload.marker = str(tmp_path / "pwned")
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    torch.save({"encoder.embeddings.word_embeddings.weight": torch.zeros(2), "x": payload},
               tmp_path / "pytorch_model.bin", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="refused"):
        EncoderDecoderModel.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_unknown_model_type(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder"]["model_type"] = "t5"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 't5' is not supported"):
        EncoderDecoderModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000, -1])
def test_token_ids_outside_vocabulary(ours, bad_id):
    ids, mask, labels = batch()
    ids[1, 2] = bad_id
    with pytest.raises(ValueError, match=f"token id {bad_id} outside the vocabulary \\[0, {VOCAB}\\)"):
        ours(ids, mask, labels=labels)
    ids[1, 2] = 5
    bad_labels = labels.copy()
    bad_labels[0, 0] = bad_id
    with pytest.raises(ValueError, match="labels holds token id"):
        ours(ids, mask, labels=bad_labels)


def test_inputs_longer_than_position_table(ours):
    ids = np.full((1, 65), 5)
    with pytest.raises(ValueError, match="length 65, longer than the 64 positions"):
        ours(ids, decoder_input_ids=np.full((1, 3), 5))
    with pytest.raises(ValueError, match="decoder_input_ids has length 65"):
        ours(np.full((1, 3), 5), decoder_input_ids=ids)


@pytest.mark.parametrize("unset", ["decoder_start_token_id", "pad_token_id"])
def test_labels_need_start_and_pad_ids(ours, unset):
    model = EncoderDecoderModel(ours.config.replace(**{unset: None}), params=ours.params)
    ids, mask, labels = batch()
    with pytest.raises(ConfigError, match=f"config.{unset} must be set"):
        model(ids, mask, labels=labels)


def test_mask_shape_must_match_ids(ours):
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(ids, mask[:, :-1], labels=labels)


def test_unknown_warm_start_option(minilm_path):
    with pytest.raises(ConfigError, match="unknown option"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(minilm_path, minilm_path, not_an_option=1)
    with pytest.raises(ConfigError, match="BertConfig has no field"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(minilm_path, minilm_path, decoder_not_a_field=1)


def test_not_a_folder_nor_hub_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="neither a local folder nor a reachable hub repo"):
        EncoderDecoderModel.from_pretrained(str(tmp_path / "nope"))
