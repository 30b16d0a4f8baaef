"""Bad checkpoints and bad inputs: each gives a clear error that names the problem."""

from __future__ import annotations

import json
import os
import pickle
import re

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_reference import VOCAB, batch, hf_encoder_decoder
from jaxencdec import CheckpointError, ConfigError, EncoderDecoderModel, storage


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


def test_params_of_another_shape_given_to_the_model_name_the_parameter_and_both_shapes(ours, monkeypatch):
    """The shape check of every parameter read (``DirectParams``), as flax's own param check words it; flax's
    check traced each parameter's initializer at every trace, the library's compares shapes without tracing."""
    from flax import errors as flax_errors
    from flax import linen as nn

    traced = []
    normal = nn.initializers.normal

    def counted_normal(*args, **kwargs):
        init = normal(*args, **kwargs)
        return lambda *a, **k: traced.append(a[1]) or init(*a, **k)

    monkeypatch.setattr(nn.initializers, "normal", counted_normal)
    ids, mask, labels = batch()
    params = jax.tree.map(np.asarray, ours.params)
    ours(ids, mask, labels=labels, params=params)
    assert not traced  # no initializer was run, not even under jax.eval_shape
    kernel = params["decoder"]["layers_1"]["cross_attention"]["query"]["kernel"]
    params["decoder"]["layers_1"]["cross_attention"]["query"]["kernel"] = kernel[:, :-1]
    with pytest.raises(flax_errors.ScopeParamShapeError, match=re.escape(
            f'For parameter "kernel" in "/decoder/layers_1/cross_attention/query", the given initializer is expected '
            f"to generate shape {kernel.shape}, but the existing parameter it received has shape "
            f"{kernel[:, :-1].shape}")):
        ours(ids, mask, labels=labels, params=params)


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
    supported = ("'albert', 'bart', 'bert', 'bert-generation', 'camembert', 'distilbert', 'electra', 'gemma3_text', "
                 "'gpt2', 'llama', 'marian', 'mbart', 'modernbert', 'qwen2', 'roberta', 'xlm-roberta'")
    with pytest.raises(ConfigError, match=re.escape(f"model_type 't5' is not supported; supported: [{supported}]")):
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
    with pytest.raises(ConfigError, match=r"'hidden_sizee' \(did you mean 'hidden_size'"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(minilm_path, minilm_path, encoder_hidden_sizee=64)
    with pytest.raises(ConfigError, match=r"field num_hidden_layers must be of type int, got '2' \(str\)"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(minilm_path, minilm_path, decoder_num_hidden_layers="2")


def test_not_a_folder_nor_hub_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="neither a local folder nor a reachable hub repo"):
        EncoderDecoderModel.from_pretrained(str(tmp_path / "nope"))


# ------------------------------------------------------------------ shapes at the API boundary


@pytest.mark.parametrize("argument", ["input_ids", "decoder_input_ids", "labels"])
@pytest.mark.parametrize("empty", [np.s_[:0], np.s_[:, :0]], ids=["no rows", "no columns"])
def test_empty_inputs_are_named(ours, argument, empty):
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_input_ids=np.clip(labels, 0, None))
    if argument == "input_ids":
        inputs["attention_mask"] = mask[empty]
    inputs[argument] = inputs[argument][empty]
    with pytest.raises(ValueError, match=f"^{argument} has shape .*at least one row and at least one token"):
        ours(**inputs)


def test_batch_size_mismatch_is_named(ours):
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match=r"labels has shape \(2, 7\) but input_ids has shape \(3, 9\)"):
        ours(ids, mask, labels=labels[:2])
    with pytest.raises(ValueError, match=r"decoder_input_ids has shape \(2, 7\) but input_ids has shape \(3, 9\)"):
        ours(ids, mask, decoder_input_ids=np.clip(labels, 0, None)[:2])


def test_labels_must_match_decoder_input_ids(ours):
    """transformers raises too (cross-entropy over 21 logits rows against 18 labels)."""
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match=r"labels has shape \(3, 6\) but decoder_input_ids has shape \(3, 7\)"):
        ours(ids, mask, decoder_input_ids=np.clip(labels, 0, None), labels=labels[:, :-1])


# ------------------------------------------------------------------ no silent casts


def test_float_and_bool_masks_of_zeros_and_ones_act_as_transformers(ours):
    """transformers turns the mask into bools: a float 0.0/1.0 mask gives the int mask's logits there and here."""
    ids, mask, labels = batch()
    hf = hf_encoder_decoder("bert", "gpt2")
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask, dtype=torch.float32),
                    labels=torch.tensor(labels)).logits.numpy()
    expected = np.asarray(ours(ids, mask, labels=labels).logits)
    np.testing.assert_allclose(expected, theirs, atol=1e-4)
    for other in (mask.astype(np.float32), mask.astype(bool)):
        np.testing.assert_array_equal(np.asarray(ours(ids, other, labels=labels).logits), expected)


@pytest.mark.parametrize("value", [0.5, 2, np.nan])
def test_masks_other_than_zeros_and_ones_are_rejected(ours, value):
    """A 0.5 mask used to be truncated to 0 (every token masked); transformers would read any nonzero as 1."""
    ids, mask, labels = batch()
    bad = np.where(mask == 1, value, 0)
    with pytest.raises(ValueError, match="^attention_mask must hold only 0 .padding. and 1"):
        ours(ids, bad, labels=labels)
    with pytest.raises(ValueError, match="^decoder_attention_mask must hold only 0"):
        ours(ids, mask, labels=labels, decoder_attention_mask=np.where(labels != -100, value, 0))
    with pytest.raises(ValueError, match="^attention_mask must hold only 0"):
        ours.generate(ids, bad, max_new_tokens=2)


@pytest.mark.parametrize("argument", ["labels", "decoder_input_ids", "input_ids"])
@pytest.mark.parametrize("values", ["whole", "fractional"])
def test_float_ids_and_labels_are_rejected(ours, argument, values):
    """Ids and labels must have an integer dtype, whole-valued floats included: transformers' embedding and loss
    refuse float tensors too, and a fractional label used to be truncated silently."""
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_input_ids=np.clip(labels, 0, None))
    inputs[argument] = inputs[argument].astype(np.float32) + (0.5 if values == "fractional" else 0.0)
    with pytest.raises(ValueError, match=f"^{argument} must hold integer token ids, got dtype float32"):
        ours(**inputs)


def test_bool_labels_are_rejected(ours):
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="^labels must hold integer token ids, got dtype bool"):
        ours(ids, mask, labels=labels > 50)


# ------------------------------------------------------------------ folder-atomic saves


def _other_model(model):
    """A model that differs from ``model`` in every weight and in its config."""
    params = jax.tree.map(lambda x: x + 1, model.params)
    return EncoderDecoderModel(model.config.replace(decoder_start_token_id=5), params=params)


def _assert_same_model(loaded, model):
    assert loaded.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)


@pytest.mark.parametrize("save", ["save_pretrained", "export_pytorch"])
def test_failed_save_keeps_previous_model_whole(ours, tmp_path, monkeypatch, save):
    """config.json failing to write used to leave the new weights beside the old config."""
    folder = tmp_path / "model"
    getattr(ours, save)(folder)
    (folder / "vocab.txt").write_text("[PAD]\n")
    real_write_json = storage.write_json

    def config_write_fails(obj, path):
        if os.path.basename(path) == "config.json":
            raise OSError("disk full (simulated)")
        real_write_json(obj, path)

    monkeypatch.setattr(storage, "write_json", config_write_fails)
    other = _other_model(ours)
    with pytest.raises(OSError, match="simulated"):
        getattr(other, save)(folder)
    _assert_same_model(EncoderDecoderModel.from_pretrained(folder), ours)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no staging folder left behind

    monkeypatch.setattr(storage, "write_json", real_write_json)
    getattr(other, save)(folder)
    _assert_same_model(EncoderDecoderModel.from_pretrained(folder), other)
    assert (folder / "vocab.txt").read_text() == "[PAD]\n"  # files the save does not write are kept
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_failed_swap_restores_previous_model(ours, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    ours.save_pretrained(folder)
    real_rename, renames = os.rename, []

    def second_rename_fails(src, dst):  # the first moves the old folder away, the second would move the new in
        renames.append(dst)
        if len(renames) == 2:
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(storage.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="simulated"):
        _other_model(ours).save_pretrained(folder)
    monkeypatch.undo()
    assert renames[1:] == [folder, folder]  # the new folder failed to move in, the old one moved back
    _assert_same_model(EncoderDecoderModel.from_pretrained(folder), ours)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_drops_stale_weights_of_another_format(ours, tmp_path):
    """find_weights prefers model.safetensors: a stale one left by export_pytorch would shadow the new save."""
    ours.export_pytorch(tmp_path / "model")
    other = _other_model(ours)
    other.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "model.safetensors").exists()
    _assert_same_model(EncoderDecoderModel.from_pretrained(tmp_path / "model"), other)


def test_save_into_the_working_directory(ours, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    ours.save_pretrained(folder)
    monkeypatch.chdir(folder)
    other = _other_model(ours)
    other.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), folder)  # the process follows the new folder, not the removed one
    _assert_same_model(EncoderDecoderModel.from_pretrained(folder), other)


def test_save_onto_a_file_is_named(ours, tmp_path):
    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="model: exists and is not a folder"):
        ours.save_pretrained(tmp_path / "model")
