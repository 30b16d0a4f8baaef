"""Configs round-trip Hugging Face config.json and validate with clear errors."""

from __future__ import annotations

import json
import re

import pytest
import transformers
from huggingface_hub.errors import StrictDataclassFieldValidationError

from hf_reference import SMALL
from jaxencdec import (AlbertConfig, BartConfig, BertConfig, BertGenerationConfig, CamembertConfig, ConfigError,
                       DistilBertConfig, ElectraConfig, EncoderDecoderConfig, Gemma3TextConfig, GPT2Config,
                       GenerationConfig, LlamaConfig, MarianConfig, MBartConfig, ModernBertConfig, Qwen2Config,
                       RobertaConfig, XLMRobertaConfig)
from jaxencdec.config import HFConfig

OURS = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig, "camembert": CamembertConfig,
        "bert-generation": BertGenerationConfig, "electra": ElectraConfig, "distilbert": DistilBertConfig,
        "albert": AlbertConfig, "gpt2": GPT2Config, "bart": BartConfig, "mbart": MBartConfig, "marian": MarianConfig,
        "modernbert": ModernBertConfig, "llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3_text": Gemma3TextConfig}
HF = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
      "xlm-roberta": transformers.XLMRobertaConfig, "camembert": transformers.CamembertConfig,
      "bert-generation": transformers.BertGenerationConfig, "electra": transformers.ElectraConfig,
      "distilbert": transformers.DistilBertConfig, "albert": transformers.AlbertConfig,
      "gpt2": transformers.GPT2Config, "bart": transformers.BartConfig, "mbart": transformers.MBartConfig,
      "marian": transformers.MarianConfig, "modernbert": transformers.ModernBertConfig,
      "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
      "gemma3_text": transformers.Gemma3TextConfig}


@pytest.mark.parametrize("arch", list(OURS))
def test_defaults_equal_transformers(arch):
    ours = OURS[arch]().to_dict()
    theirs = HF[arch]().to_dict()
    for key, value in ours.items():
        if key in theirs and theirs[key] is not None:
            assert value == theirs[key], (arch, key)


@pytest.mark.parametrize("arch", list(SMALL))
def test_config_json_round_trip_keeps_every_key(arch, tmp_path):
    hf = SMALL[arch]()
    hf.save_pretrained(tmp_path)
    original = json.loads((tmp_path / "config.json").read_text())
    original["some_future_key"] = {"nested": [1, 2]}
    ours = HFConfig.from_dict(original)
    assert type(ours) is OURS[arch]
    written = ours.to_dict()
    assert {k: written[k] for k in original} == original
    assert HFConfig.from_dict(json.loads(json.dumps(written))) == ours


def test_encoder_decoder_config_round_trip_through_transformers(tmp_path):
    hf = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(SMALL["bert"](), SMALL["gpt2"]())
    hf.decoder_start_token_id, hf.pad_token_id = 3, 0
    hf.save_pretrained(tmp_path)
    original = json.loads((tmp_path / "config.json").read_text())
    ours = EncoderDecoderConfig.from_dict(original)
    assert ours.decoder.is_decoder and ours.decoder.add_cross_attention and not ours.encoder.is_decoder
    written = ours.to_dict()
    for key in original:
        if key not in ("encoder", "decoder"):
            assert written[key] == original[key], key
    for part in ("encoder", "decoder"):
        assert {k: written[part][k] for k in original[part]} == original[part]
    (tmp_path / "config.json").write_text(json.dumps(written))
    again = transformers.EncoderDecoderConfig.from_pretrained(tmp_path)
    assert again.decoder.add_cross_attention and again.decoder_start_token_id == 3


def test_from_encoder_decoder_configs_sets_decoder_flags():
    config = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(is_decoder=True), GPT2Config())
    assert config.decoder.is_decoder and config.decoder.add_cross_attention
    assert not config.encoder.is_decoder and not config.encoder.add_cross_attention
    assert not config.needs_projection


def test_decoder_without_cross_attention_is_rejected():
    with pytest.raises(ConfigError, match="add_cross_attention"):
        EncoderDecoderConfig(encoder=BertConfig(), decoder=GPT2Config())


@pytest.mark.parametrize("config, message", [
    (BertConfig(hidden_size=30, num_attention_heads=4), "hidden size 30 is not divisible by the number of "
                                                        "attention heads 4"),
    (BertConfig(hidden_act="mish"), "activation 'mish' is not supported"),
    (BertConfig(position_embedding_type="rotary"), "position_embedding_type 'rotary' is not supported; use one of "
                                                   "'absolute', 'relative_key', 'relative_key_query'"),
    (GPT2Config(scale_attn_by_inverse_layer_idx=True), "scaling variants"),
    (DistilBertConfig(sinusoidal_pos_embds=True), "sinusoidal_pos_embds=True"),
])
def test_invalid_configs_are_rejected_clearly(config, message):
    with pytest.raises(ConfigError, match=message):
        EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), config) if isinstance(config, GPT2Config) \
            else config.spec("encoder")


def test_gpt2_cannot_be_an_encoder():
    with pytest.raises(ConfigError, match="decoder only"):
        EncoderDecoderConfig.from_encoder_decoder_configs(GPT2Config(), BertConfig())


def test_distilbert_cannot_be_a_decoder():
    with pytest.raises(ConfigError, match="DistilBERT is supported as an encoder only"):
        EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), DistilBertConfig())


def test_modernbert_is_an_encoder_that_scans_from_its_second_layer():
    with pytest.raises(ConfigError, match="ModernBERT is supported as an encoder only"):
        EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), ModernBertConfig())
    with pytest.raises(ConfigError, match="needs 2 layers or more; this one has 1: set scan_layers=False"):
        EncoderDecoderConfig.from_encoder_decoder_configs(ModernBertConfig(num_hidden_layers=1), BertConfig(),
                                                          scan_layers=True)
    EncoderDecoderConfig.from_encoder_decoder_configs(ModernBertConfig(num_hidden_layers=2), BertConfig(),
                                                      scan_layers=True)
    spec = ModernBertConfig(num_hidden_layers=4).spec("encoder")
    # every third layer global; the others see 64 tokens either side (local_attention 128)
    assert spec.layer_kinds == ("full", "sliding", "sliding", "full") and spec.sliding_window == 65
    assert (spec.rotary_theta, spec.local_rotary_theta) == (160000.0, 10000.0)


def test_llm_families_are_decoders_whose_unsupported_settings_name_the_fix():
    for llm in (LlamaConfig(), Qwen2Config(), Gemma3TextConfig()):
        with pytest.raises(ConfigError, match="supported as a decoder only"):
            EncoderDecoderConfig.from_encoder_decoder_configs(llm, BertConfig())
    with pytest.raises(ConfigError, match="use_sliding_window to false"):
        Qwen2Config(use_sliding_window=True).spec("decoder")
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0 is not supported"):
        Gemma3TextConfig(final_logit_softcapping=30.0).spec("decoder")
    spec = Gemma3TextConfig(num_hidden_layers=7).spec("decoder")  # every sixth layer global
    assert spec.layer_kinds == ("sliding",) * 5 + ("full", "sliding") and spec.sliding_window == 4096
    # transformers 4's names for the rotary bases
    old = Gemma3TextConfig.from_dict({"model_type": "gemma3_text", "rope_theta": 5e5, "rope_local_base_freq": 2e3})
    assert (old.spec("decoder").rotary_theta, old.spec("decoder").local_rotary_theta) == (5e5, 2e3)


def test_albert_is_an_encoder_of_shared_layers_only():
    with pytest.raises(ConfigError, match="ALBERT is supported as an encoder only"):
        EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), AlbertConfig())
    with pytest.raises(ConfigError, match="inner_group_num=2"):
        EncoderDecoderConfig.from_encoder_decoder_configs(AlbertConfig(inner_group_num=2), BertConfig())
    with pytest.raises(ConfigError, match="12 layers cannot share parameters in 5 groups"):
        EncoderDecoderConfig.from_encoder_decoder_configs(AlbertConfig(num_hidden_groups=5), BertConfig())
    spec = AlbertConfig(num_hidden_groups=3).spec("encoder")
    assert spec.num_layer_params == 3 and [spec.layer_params(i) for i in (0, 3, 4, 11)] == [(0, 0), (0, 3), (1, 0),
                                                                                           (2, 3)]


def test_configs_are_hashable_with_eos_lists():
    config = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), BartConfig(eos_token_id=[2, 3]))
    assert hash(config) == hash(EncoderDecoderConfig.from_dict(config.to_dict()))
    assert config.to_dict()["decoder"]["eos_token_id"] == [2, 3]


def test_generation_config_round_trip_and_merge(tmp_path):
    config = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), BertConfig(), decoder_start_token_id=101,
                                                               pad_token_id=0, eos_token_id=102)
    generation = GenerationConfig.from_model_config(config)
    assert (generation.decoder_start_token_id, generation.pad_token_id, generation.eos_token_id) == (101, 0, 102)
    generation = generation.replace(num_beams=4, eos_token_id=[102, 7], bad_words_ids=[[5], [6, 7]])
    generation.save(tmp_path / "generation_config.json")
    assert GenerationConfig.from_json_file(tmp_path / "generation_config.json") == generation
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert hf.num_beams == 4 and hf.eos_token_id == [102, 7]


@pytest.mark.parametrize("part, field, value, expected", [
    ("encoder", "hidden_size", "32", "int"),
    ("encoder", "vocab_size", None, "int"),
    ("encoder", "num_hidden_layers", True, "int"),
    ("encoder", "hidden_size", 32.0, "int"),
    ("encoder", "is_decoder", 1, "bool"),
    ("encoder", "hidden_act", 3, "str"),
    ("decoder", "n_embd", "32", "int"),
    ("decoder", "eos_token_id", [2, "3"], "int | list[int] | None"),
    ("decoder", "layer_norm_epsilon", "1e-5", "float"),
])
def test_config_json_field_types_are_checked(tmp_path, part, field, value, expected):
    """Where a value has the wrong type, transformers' strict configs refuse it as well; ours name the file."""
    hf = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(SMALL["bert"](), SMALL["gpt2"]())
    data = hf.to_dict()
    data[part][field] = value
    with pytest.raises(StrictDataclassFieldValidationError, match=field):
        type(getattr(hf, part))(**{field: value})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    message = f"{path}: {part}: field {field} must be of type {expected}, got {value!r}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        EncoderDecoderConfig.from_json_file(path)


def test_top_level_field_types_are_checked(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), BertConfig())
                                .to_dict(), "pad_token_id": "0"}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field pad_token_id must be of type int | None, got '0'")):
        EncoderDecoderConfig.from_json_file(path)


def test_whole_numbers_are_accepted_for_float_fields():
    """An int is an exact float: accepted as transformers accepts it for dropout fields (its strict configs refuse
    it for layer_norm_eps; we accept it there too, nothing is lost)."""
    config = HFConfig.from_dict({"model_type": "bert", "hidden_dropout_prob": 0, "layer_norm_eps": 1})
    assert config.hidden_dropout_prob == 0 and config.layer_norm_eps == 1
    assert transformers.BertConfig(hidden_dropout_prob=0).hidden_dropout_prob == 0


def test_unknown_keys_kept_from_files_but_refused_as_overrides():
    """transformers keeps an unknown key of config.json (and BertConfig(hidden_sizee=3)) as an attribute; so do
    we, for the round trip. A programmatic override naming no field is an error listing the close matches."""
    assert transformers.BertConfig(hidden_sizee=3).hidden_sizee == 3
    config = HFConfig.from_dict({"model_type": "bert", "hidden_sizee": 3})
    assert config.extra == {"hidden_sizee": 3} and config.to_dict()["hidden_sizee"] == 3
    with pytest.raises(ConfigError, match=r"BertConfig has no field\(s\) 'hidden_sizee' \(did you mean 'hidden_size'"):
        config.replace(hidden_sizee=64)
    pair = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), GPT2Config())
    with pytest.raises(ConfigError, match=r"'pad_token_idd' \(did you mean 'pad_token_id'"):
        pair.replace(pad_token_idd=0)
    with pytest.raises(ConfigError, match=r"'n_embd'; .*config\.replace\(decoder=config\.decoder\.replace"):
        pair.replace(n_embd=64)
    assert pair.replace(pad_token_id=0).pad_token_id == 0


def test_overrides_are_type_checked():
    with pytest.raises(ConfigError, match="field hidden_size must be of type int, got '64'"):
        BertConfig().replace(hidden_size="64")
    with pytest.raises(ConfigError, match="field tie_encoder_decoder must be of type bool, got 0"):
        EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), BertConfig(), tie_encoder_decoder=0)
