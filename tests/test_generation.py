"""Generation: processors against transformers' own, sampling statistics on hand-built logits, the jitted API
(no retrace, buckets, fixed-length output), config merging, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers.generation.logits_process as hf_lp

from jaxencdec import (BertConfig, EncoderDecoderConfig, EncoderDecoderModel, GenerationConfig,
                       GenerationConfigError, GPT2Config)
from jaxencdec.generation import api
from jaxencdec.generation.processors import build_logits_processor, fast_top_k, processor_names
from jaxencdec.generation.search import sample_search

VOCAB, START, PAD, EOS = 120, 3, 0, 2
# Tests share these settings (and a batch of 3 sources) so that they share compilations.
GREEDY = dict(max_new_tokens=8)
BEAMS = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3)


@pytest.fixture(scope="module")
def model():
    """A small random bert2gpt2 of ours; a large init range keeps its logits away from ties."""
    encoder = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=80, initializer_range=0.4)
    decoder = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64, initializer_range=0.4,
                         bos_token_id=START, eos_token_id=EOS)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder, decoder_start_token_id=START,
                                                               pad_token_id=PAD, eos_token_id=EOS)
    return EncoderDecoderModel(config, seed=1)


def source(batch=3, length=11, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, (batch, length))
    mask = np.ones_like(ids)
    for row, n in enumerate(np.linspace(length, max(length // 2, 1), batch).astype(int)):
        ids[row, n:], mask[row, n:] = PAD, 0
    return ids, mask


# ------------------------------------------------------------------------------------------------ processors


def _hf_processor(name: str, config: GenerationConfig):
    """transformers' processor of that name, built as ``_get_logits_processor`` builds it."""
    c = config.resolve()
    eos = list(c.eos_token_ids)
    return {
        "repetition_penalty": lambda: hf_lp.RepetitionPenaltyLogitsProcessor(c.repetition_penalty),
        "no_repeat_ngram": lambda: hf_lp.NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size),
        "bad_words": lambda: hf_lp.NoBadWordsLogitsProcessor([list(w) for w in c.bad_words_ids], eos),
        "min_length": lambda: hf_lp.MinLengthLogitsProcessor(c.min_length, eos),
        "forced_bos": lambda: hf_lp.ForcedBOSTokenLogitsProcessor(c.forced_bos_token_id),
        "forced_eos": lambda: hf_lp.ForcedEOSTokenLogitsProcessor(c.max_length, c.forced_eos_token_id),
        "temperature": lambda: hf_lp.TemperatureLogitsWarper(float(c.temperature)),
        "top_k": lambda: hf_lp.TopKLogitsWarper(c.top_k),
        "top_p": lambda: hf_lp.TopPLogitsWarper(c.top_p),
    }[name]()


@pytest.mark.parametrize("cur_len", [1, 3, 7])
@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3),
    dict(bad_words_ids=[[5], [7, 8], [EOS], [9, 7, 8]]), dict(min_new_tokens=4), dict(forced_bos_token_id=11),
    dict(forced_eos_token_id=13), dict(do_sample=True, temperature=0.7, top_k=0),
    dict(do_sample=True, top_k=5), dict(do_sample=True, top_k=0, top_p=0.8),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items() if k != "do_sample"))
def test_each_processor_matches_transformers(options, cur_len):
    config = GenerationConfig(max_length=8, eos_token_id=EOS, decoder_start_token_id=START, **options)
    process = build_logits_processor(config)
    assert len(process.names) == 1
    rng = np.random.default_rng(cur_len)
    # Small vocabulary and ids so that repeats, n-grams and bad-word prefixes really occur.
    buffer = rng.integers(5, 10, (6, config.resolve().max_length)).astype(np.int32)
    scores = rng.normal(size=(6, 16)).astype(np.float32)
    ours = process(jnp.asarray(buffer), jnp.int32(cur_len), jnp.asarray(scores))
    reference = _hf_processor(process.names[0], config)
    want = reference(torch.tensor(buffer[:, :cur_len], dtype=torch.long), torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.asarray(ours), want)


@pytest.mark.parametrize("penalty", [0.6, 1.5, 3.0])
def test_encoder_repetition_penalty_matches_transformers(penalty):
    """Each row (3 per input, as with beams) favours its input's tokens; bucket padding past the caller's input
    (``source_valid`` False) does not count."""
    config = GenerationConfig(max_length=8, decoder_start_token_id=START, encoder_repetition_penalty=penalty)
    rng = np.random.default_rng(0)
    source = rng.integers(0, 16, (2, 5)).astype(np.int32)
    scores = rng.normal(size=(6, 16)).astype(np.float32)  # both signs: they are scaled differently
    buffer = rng.integers(5, 10, (6, 8)).astype(np.int32)
    valid = np.broadcast_to(np.arange(7) < 5, (6, 7))
    bucketed = np.pad(np.repeat(source, 3, axis=0), ((0, 0), (0, 2)), constant_values=15)
    process = build_logits_processor(config, jnp.asarray(bucketed), jnp.asarray(valid))
    assert process.names == ("encoder_repetition_penalty",)
    ours = process(jnp.asarray(buffer), jnp.int32(3), jnp.asarray(scores))
    reference = hf_lp.EncoderRepetitionPenaltyLogitsProcessor(float(penalty), torch.tensor(source, dtype=torch.long))
    want = reference(torch.tensor(buffer[:, :3], dtype=torch.long), torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.asarray(ours), want)
    assert (want != scores).any()
    with pytest.raises(ValueError, match="encoder input ids"):
        build_logits_processor(config)


@pytest.mark.parametrize("ngram_size", [1, 2, 3])
@pytest.mark.parametrize("cur_len", [1, 2, 4])
def test_encoder_no_repeat_ngram_matches_transformers(ngram_size, cur_len):
    """Bans completions of the input's n-grams (3 rows per input, as with beams); n-grams reaching into bucket
    padding past the caller's input do not count."""
    config = GenerationConfig(max_length=8, decoder_start_token_id=START, encoder_no_repeat_ngram_size=ngram_size)
    rng = np.random.default_rng(cur_len)
    source = rng.integers(5, 9, (2, 6)).astype(np.int32)  # few distinct ids: n-grams repeat in the sequences
    buffer = rng.integers(5, 9, (6, 8)).astype(np.int32)
    scores = rng.normal(size=(6, 16)).astype(np.float32)
    valid = np.broadcast_to(np.arange(8) < 6, (6, 8))
    bucketed = np.pad(np.repeat(source, 3, axis=0), ((0, 0), (0, 2)), constant_values=5)
    process = build_logits_processor(config, jnp.asarray(bucketed), jnp.asarray(valid))
    assert process.names == ("encoder_no_repeat_ngram",)
    ours = process(jnp.asarray(buffer), jnp.int32(cur_len), jnp.asarray(scores))
    reference = hf_lp.EncoderNoRepeatNGramLogitsProcessor(ngram_size, torch.tensor(source, dtype=torch.long))
    want = reference(torch.tensor(buffer[:, :cur_len], dtype=torch.long), torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.asarray(ours), want)
    if cur_len >= ngram_size - 1 and ngram_size < 3:
        assert np.isinf(want).any()  # the case bans something


def test_unimplemented_transformers_options_are_errors_unless_neutral(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text('{"decoder_start_token_id": 3, "typical_p": 0.9, "epsilon_cutoff": 0.0, '
                    '"transformers_version": "5"}')
    config = GenerationConfig.from_json_file(path)
    with pytest.raises(GenerationConfigError, match="typical_p=0.9"):
        config.resolve()
    assert GenerationConfig.from_dict({**config.to_dict(), "typical_p": 1.0}).resolve().num_beams == 1
    with pytest.raises(GenerationConfigError, match="min_p=0.1"):
        config.replace(typical_p=None, min_p=0.1).resolve()


def test_processor_order_is_transformers_order():
    config = GenerationConfig(
        eos_token_id=EOS, decoder_start_token_id=START, encoder_repetition_penalty=1.5, repetition_penalty=1.2,
        no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=3,
        bad_words_ids=[[5]], min_new_tokens=2, forced_bos_token_id=4, forced_eos_token_id=EOS, do_sample=True,
        temperature=0.5, top_k=10, top_p=0.9)
    assert processor_names(config) == ("encoder_repetition_penalty", "repetition_penalty", "no_repeat_ngram",
                                       "encoder_no_repeat_ngram", "bad_words", "min_length",
                                       "forced_bos", "forced_eos", "temperature", "top_k", "top_p")
    # Warpers only when sampling; min length only with an EOS id; defaults add nothing.
    assert processor_names(config.replace(do_sample=False))[-1] == "forced_eos"
    assert "min_length" not in processor_names(config.replace(eos_token_id=None))
    assert processor_names(GenerationConfig(decoder_start_token_id=START, do_sample=True)) == ("top_k",)


# ------------------------------------------------------------------------------------------------ sampling


LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.3, -0.9, -1.5, -2.2, -3.0], np.float32)


def _expected(temperature=1.0, top_k=0, top_p=1.0):
    """The exact distribution transformers samples from, computed independently in float64."""
    scores = LOGITS.astype(np.float64) / temperature
    keep = np.ones_like(scores, bool)
    if top_k:
        keep &= scores >= np.sort(scores)[-top_k]
    probs = np.where(keep, np.exp(scores - scores.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(probs)  # ascending; drop the low tail holding at most 1 - top_p of the mass
        drop = np.cumsum(probs[order]) <= 1 - top_p
        drop[-1] = False
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("options", [
    dict(temperature=0.7, top_k=0), dict(temperature=1.5, top_k=0), dict(top_k=4), dict(top_k=0, top_p=0.75),
    dict(temperature=0.8, top_k=6, top_p=0.9),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sampling_frequencies_match_the_exact_distribution(options):
    draws = 20000
    config = GenerationConfig(do_sample=True, max_new_tokens=1, decoder_start_token_id=0, **options)
    process = build_logits_processor(config)

    def decode(ids, cache, index, slots):  # hand-built logits, the same at every step and for every row; no records
        return jnp.broadcast_to(jnp.asarray(LOGITS), (ids.shape[0], LOGITS.size)), cache, None

    run = jax.jit(lambda key: sample_search(decode, None, jnp.zeros((draws,), jnp.int32), max_length=2,
                                            process=process, eos_ids=(), pad_id=None, do_sample=True, rng=key))
    tokens = np.asarray(run(jax.random.key(42)).sequences[:, 1])
    counts = np.bincount(tokens, minlength=LOGITS.size)
    probs = _expected(**options)
    assert counts[probs == 0].sum() == 0, "a filtered token was sampled"
    kept = probs > 0
    result = scipy.stats.chisquare(counts[kept], probs[kept] * draws)
    assert result.pvalue > 1e-3, (counts, probs * draws)


def test_top_k_1_sampling_is_greedy(model):
    ids, mask = source()
    greedy = np.asarray(model.generate(ids, mask, **GREEDY))
    sampled = model.generate(ids, mask, **GREEDY, do_sample=True, top_k=1, num_return_sequences=2,
                             prng_key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(sampled), np.repeat(greedy, 2, axis=0))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_sampling_is_reproducible_with_a_fixed_key(model, num_beams):
    ids, mask = source()
    options = dict(max_new_tokens=10, do_sample=True, num_beams=num_beams, top_k=0)
    first = model.generate(ids, mask, prng_key=jax.random.key(7), **options)
    again = model.generate(ids, mask, prng_key=jax.random.key(7), **options)
    other = model.generate(ids, mask, prng_key=jax.random.key(8), **options)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


# ------------------------------------------------------------------------------------------------ the API


def test_second_call_in_the_same_bucket_does_not_retrace(model):
    ids, mask = source(length=11, seed=1)
    model.generate(ids, mask, **BEAMS)
    traces = api.trace_count()
    other_ids, other_mask = source(length=25, seed=2)  # other text, other length, same 32-token bucket
    model.generate(other_ids, other_mask, **BEAMS)
    model.generate(jnp.asarray(ids), mask.tolist(), **BEAMS)  # jax / list inputs
    model.generate(ids, mask, **BEAMS, return_dict_in_generate=True, output_scores=True)  # output options
    assert api.trace_count() == traces
    model.generate(*source(length=40, seed=3), **BEAMS)  # the next bucket: one compilation more
    assert api.trace_count() == traces + 1


def test_make_generate_fn_is_pure_fixed_length_and_does_not_retrace(model):
    config = model.generation_config.replace(**BEAMS)
    fn = api.make_generate_fn(model.config, config)
    ids, mask = source(length=16, seed=4)
    out = fn(model.params, ids, mask, None)
    assert out.shape == (ids.shape[0] * 3, 7) and out.dtype == jnp.int32
    traces = api.trace_count()
    fn(model.params, source(length=16, seed=5)[0], mask, None)
    assert api.trace_count() == traces
    # generate() returns the same, with the all-filler columns trimmed.
    trimmed = np.asarray(model.generate(ids, mask, generation_config=config))
    np.testing.assert_array_equal(np.asarray(out)[:, :trimmed.shape[1]], trimmed)
    assert (np.asarray(out)[:, trimmed.shape[1]:] == api.beam_fill_id(config.resolve())).all()
    assert "Static" in fn.__doc__ and "Traced" in fn.__doc__


def test_greedy_pads_after_eos_and_trims_like_transformers(model):
    ids, mask = source(batch=4, seed=6)
    free = np.asarray(model.generate(ids, mask, max_new_tokens=8, eos_token_id=None))
    assert free.shape == (4, 9)
    eos = int(free[0, 2])  # a token row 0 emits: it now ends row 0 (and maybe others) early
    out = np.asarray(model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos))
    ends = [int(np.nonzero(row[1:] == eos)[0][0]) + 1 if (row[1:] == eos).any() else None for row in free]
    assert out.shape[1] == max(9 if end is None else end + 1 for end in ends)  # the longest row, no more
    for row, end in zip(range(4), ends):
        stop = out.shape[1] if end is None else end + 1
        np.testing.assert_array_equal(out[row, :stop], free[row, :stop])  # the same tokens up to the EOS
        assert (out[row, stop:] == PAD).all()  # then padding
    fixed = np.asarray(api.make_generate_fn(model.config, model.generation_config.replace(
        max_new_tokens=8, eos_token_id=eos))(model.params, ids, mask, None))
    assert fixed.shape == (4, 9)
    np.testing.assert_array_equal(fixed[:, :out.shape[1]], out)
    assert (fixed[:, out.shape[1]:] == PAD).all()


def test_source_bucket_padding_does_not_change_results(model):
    ids, mask = source(length=11, seed=7)
    padded_ids = np.pad(ids, ((0, 0), (0, 30)), constant_values=PAD)
    padded_mask = np.pad(mask, ((0, 0), (0, 30)))  # 41 tokens: the 64 bucket instead of 32
    for options in (GREEDY, BEAMS):
        np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, **options)),
                                      np.asarray(model.generate(padded_ids, padded_mask, **options)))


def test_a_row_with_an_all_zero_mask_is_not_changed_by_source_padding(model):
    """Such a row attends uniformly over every position it has: generate must not add bucket positions to it."""
    ids, mask = source(length=11, seed=7)
    mask[1] = 0
    for options in (GREEDY, BEAMS):
        got = np.asarray(model.generate(ids, mask, **options))
        fn = api.make_generate_fn(model.config, model.generation_config.replace(**options))
        np.testing.assert_array_equal(got, np.asarray(fn(model.params, ids, mask, None))[:, :got.shape[1]])


def test_return_dict_gives_beam_scores_only_for_beams(model):
    ids, mask = source()
    out = model.generate(ids, mask, **BEAMS, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape[0] == 9 and out.sequences_scores.shape == (9,)
    scores = np.asarray(out.sequences_scores).reshape(3, 3)
    assert (np.diff(scores, axis=1) <= 0).all(), "hypotheses are returned best first"
    np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(model.generate(ids, mask, **BEAMS)))
    assert model.generate(ids, mask, **GREEDY, return_dict_in_generate=True,
                          output_scores=True).sequences_scores is None
    assert model.generate(ids, mask, **BEAMS, return_dict_in_generate=True).sequences_scores is None


# ------------------------------------------------------------------------------------------------ the config


def test_resolve_follows_transformers_length_and_token_rules():
    c = GenerationConfig(decoder_start_token_id=START).resolve()
    assert c.max_length == 21 and c.max_new_tokens == 20  # transformers 5's default: 20 new tokens
    c = GenerationConfig(decoder_start_token_id=START, max_length=12, max_new_tokens=5).resolve()
    assert c.max_length == 6  # max_new_tokens wins, and the start token counts
    assert GenerationConfig(bos_token_id=7, max_length=12).resolve().decoder_start_token_id == 7
    c = GenerationConfig(decoder_start_token_id=START, eos_token_id=[5, 6], min_new_tokens=3, min_length=9).resolve()
    assert (c.pad_token_id, c.eos_token_id, c.min_length) == (5, (5, 6), 4)
    assert c.resolve() == c


def test_generate_merges_kwargs_over_config_over_model_defaults(model):
    merged = api.merge_config(model.generation_config, GenerationConfig(num_beams=3), {"max_new_tokens": 4})
    assert (merged.num_beams, merged.max_new_tokens, merged.decoder_start_token_id) == (3, 4, START)
    assert merged.eos_token_id == EOS and merged.pad_token_id == PAD


def test_generation_config_reads_transformers_json_with_nulls(tmp_path):
    (tmp_path / "g.json").write_text('{"max_length": null, "num_beams": null, "eos_token_id": [2, 5], '
                                     '"decoder_start_token_id": 3, "transformers_version": "5.24.0"}')
    config = GenerationConfig.from_json_file(tmp_path / "g.json")
    assert (config.max_length, config.num_beams, config.eos_token_id) == (None, 1, (2, 5))
    config.save(tmp_path / "out.json")
    assert GenerationConfig.from_json_file(tmp_path / "out.json") == config


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_length=1), "max_length"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(encoder_repetition_penalty=-2.0), "encoder_repetition_penalty"),
    (dict(encoder_no_repeat_ngram_size=-1), "encoder_no_repeat_ngram_size"),
    (dict(do_sample=True, min_p=0.05), "does not implement"),
    (dict(eos_token_id=VOCAB), "eos_token_id"),
    (dict(bad_words_ids=[[5, VOCAB + 3]]), "bad_words_ids"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(forced_eos_token_id=-1), "forced_eos_token_id"),
    (dict(max_new_tokens=200), "positions"),
    (dict(num_beam=4), "unknown generation option"),
])
def test_bad_generation_options_raise_clear_errors(model, options, message):
    ids, mask = source()
    with pytest.raises(GenerationConfigError, match=message):
        model.generate(ids, mask, **options)


def test_make_generate_fn_checks_its_config_and_key(model):
    with pytest.raises(GenerationConfigError, match="positions"):
        api.make_generate_fn(model.config, model.generation_config.replace(max_new_tokens=500))
    fn = api.make_generate_fn(model.config, model.generation_config.replace(max_new_tokens=2, do_sample=True))
    with pytest.raises(ValueError, match="prng_key"):
        fn(model.params, *source(), None)


def test_missing_decoder_start_token_is_a_clear_error(model):
    bare = EncoderDecoderModel(model.config.replace(decoder_start_token_id=None), params=model.params,
                               generation_config=GenerationConfig(eos_token_id=EOS, pad_token_id=PAD))
    with pytest.raises(GenerationConfigError, match="decoder_start_token_id"):
        bare.generate(*source(), max_new_tokens=3)
    assert bare.generate(*source(), max_new_tokens=3, decoder_start_token_id=START).shape[0] == 3


@pytest.mark.parametrize("ids, mask, message", [
    (np.array([[5, 6, VOCAB]]), None, "outside the vocabulary"),
    (np.array([[5, -1, 6]]), None, "outside the vocabulary"),
    (np.array([5, 6, 7]), None, r"\[batch, length\]"),
    (np.array([[5.0, 6.0]]), None, "integer"),
    (np.array([[5, 6, 7]]), np.array([[1, 1]]), "attention_mask"),
    (np.zeros((1, 0), np.int32), None, "at least one token"),
    (np.full((1, 90), 5), None, "longer than"),
])
def test_bad_input_ids_raise_clear_errors(model, ids, mask, message):
    with pytest.raises(ValueError, match=message):
        model.generate(ids, mask, max_new_tokens=3)


SHARDED_SCRIPT = r"""
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxencdec import BertConfig, EncoderDecoderConfig, EncoderDecoderModel, GPT2Config
from jaxencdec.generation.api import make_generate_fn
assert len(jax.devices()) == 4
encoder = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, initializer_range=0.4)
decoder = GPT2Config(vocab_size=120, n_embd=32, n_layer=1, n_head=4, n_positions=64, initializer_range=0.4)
config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder, decoder_start_token_id=3,
                                                           pad_token_id=0, eos_token_id=2)
model = EncoderDecoderModel(config, seed=1)
ids = np.random.default_rng(0).integers(4, 120, (8, 16)).astype(np.int32)
mask = np.ones_like(ids)
mesh = Mesh(np.array(jax.devices()), ("data",))
for options in (dict(num_beams=3, num_return_sequences=2),):  # beams: the cache gather crosses shards
    fn = make_generate_fn(config, model.generation_config.replace(max_new_tokens=6, **options))
    expected = np.asarray(fn(model.params, ids, mask, None))
    with mesh:
        params = jax.device_put(model.params, NamedSharding(mesh, P()))
        batch = jax.device_put((ids, mask), NamedSharding(mesh, P("data")))
        got = fn(params, *batch, None)
    np.testing.assert_array_equal(np.asarray(got), expected)
print("ok")
"""


@pytest.mark.slow
def test_make_generate_fn_runs_on_sharded_params_and_inputs_under_a_mesh():
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_fast_top_k_equals_lax_top_k_with_ties_and_infinities(k):
    rng = np.random.default_rng(k)
    scores = np.round(rng.normal(size=(6, 50_000)) * 2) / 2  # many exact ties
    scores[0, :] = -np.inf  # every token banned
    scores[1, ::3] = -np.inf
    scores[2, -k:] = 100.0  # the best at the very end (the padded last block)
    scores = jnp.asarray(scores, jnp.float32)
    values, indices = fast_top_k(scores, k)
    expected_values, expected_indices = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)


def test_shared_beam_cache_equals_reordering_per_row_caches(model):
    """Beam search's cache (one slot per beam, followed through an ancestry table) gives the same logits as
    per-row caches that are reordered after every step, for random parent choices."""
    from jaxencdec.models.transformer import init_cache

    batch, beams, length = 2, 3, 7
    rows = batch * beams
    ids, mask = source(batch=batch)
    module, variables = model.module, {"params": model.params}
    cross_kv = module.apply(variables, module.apply(variables, ids, mask, method="encode"), method="cross_kv")
    decode = jax.jit(lambda tokens, cache, index, slots: module.apply(
        variables, tokens, cross_kv, mask, None, cache, index, slots, method="decode"))
    rng = np.random.default_rng(0)
    per_row = init_cache(model.config.decoder_spec, rows, length)
    shared = init_cache(model.config.decoder_spec, batch, length, slots=beams)
    own = np.broadcast_to(np.arange(beams)[None, :, None], (batch, beams, length))
    slots = own.copy()
    tokens = jnp.full((rows, 1), START, jnp.int32)
    for index in range(length):
        expected, per_row = decode(tokens, per_row, index, None)
        got, shared = decode(tokens, shared, index, jnp.asarray(slots.reshape(rows, length), jnp.int32))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
        parent = rng.integers(0, beams, (batch, beams))  # each new beam continues a random beam of its input
        flat_parent = (parent + np.arange(batch)[:, None] * beams).reshape(rows)
        per_row = jax.tree.map(lambda x: x[flat_parent], per_row)
        slots = np.where(np.arange(length) >= index + 1, own, np.take_along_axis(slots, parent[:, :, None], 1))
        tokens = jnp.asarray(rng.integers(4, VOCAB, (rows, 1)), jnp.int32)
