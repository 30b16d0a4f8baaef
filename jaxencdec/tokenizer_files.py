"""Reading a Hugging Face tokenizer folder into a `tokenizers` pipeline: where the folder is (local, a bucket URL
or a Hub repo), its JSON files, and the pipelines transformers builds from WordPiece ``vocab.txt`` and byte-level
BPE ``vocab.json`` + ``merges.txt``, so that ids and decoded strings match its fast tokenizers.
:class:`jaxencdec.tokenizer.Tokenizer` is the API on top.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from jaxencdec import paths

SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # transformers' registration order
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Conventional special-token spellings, tried in order; the first one in the vocabulary is used when no
# config file names the token.
WORDPIECE_DEFAULTS = {"pad": ["[PAD]"], "unk": ["[UNK]"], "cls": ["[CLS]"], "sep": ["[SEP]"], "mask": ["[MASK]"]}
BYTE_LEVEL_DEFAULTS = {
    "pad": ["<pad>"],
    "unk": ["<unk>", "<|endoftext|>"],
    "bos": ["<s>", "<|endoftext|>"],
    "eos": ["</s>", "<|endoftext|>"],
    "cls": ["<s>"],
    "sep": ["</s>"],
    "mask": ["<mask>"],
}
ROBERTA_CLASSES = ("RobertaTokenizer", "BartTokenizer")

def resolve_folder(path_or_hub_id: str) -> str:
    if paths.is_url(path_or_hub_id):  # FileNotFoundError naming it when nothing is stored there
        return os.fspath(paths.existing_folder(path_or_hub_id))
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_hub_id, allow_patterns=list(TOKENIZER_FILES))
    except Exception as error:
        raise OSError(
            f"{path_or_hub_id!r} is not a local folder, and downloading its tokenizer files from the "
            f"Hugging Face Hub failed: {type(error).__name__}: {error}"
        ) from error


def read_json(path: str, missing_ok: bool = False) -> dict:
    if missing_ok and not paths.is_file(path):
        return {}
    text = read_text(path)
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"cannot read tokenizer file {path}: {error}") from error


def read_text(path: str) -> str:
    """A local file's or a bucket object's text; unreadable is a ValueError naming it (an unusable bucket URL, a
    ``paths.StorageError``)."""
    try:
        return paths.read_text(path)
    except paths.StorageError:
        raise
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read tokenizer file {path}: {error}") from error


def token_content(token) -> str | None:
    """Special tokens are stored as plain strings or as AddedToken dicts {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def add_listed_tokens(backend: Backend, listed: dict) -> None:
    """Adds ``tokenizer_config.json``'s ``added_tokens_decoder`` entries (``{"id": {"content", "special", ...}}``)
    that the vocabulary files lack, in id order as transformers does; each must land on its listed id."""
    for token_id, token in sorted(((int(i), t) for i, t in listed.items()), key=lambda item: item[0]):
        content = token_content(token)
        if backend.token_to_id(content) is None:
            special = bool(token.get("special", False))
            added = AddedToken(content, special=special, normalized=bool(token.get("normalized", not special)),
                               lstrip=bool(token.get("lstrip", False)), rstrip=bool(token.get("rstrip", False)),
                               single_word=bool(token.get("single_word", False)))
            (backend.add_special_tokens if special else backend.add_tokens)([added])
        if backend.token_to_id(content) != token_id:
            raise ValueError(f"tokenizer_config.json lists added token {content!r} with id {token_id}, but the "
                             f"vocabulary gives it id {backend.token_to_id(content)} (ids must follow the vocabulary "
                             f"without gaps)")


def build_backend(folder: str, config: dict) -> Backend:
    path = {name: os.path.join(folder, name) for name in TOKENIZER_FILES}
    if paths.is_file(path["tokenizer.json"]):
        pipeline = read_text(path["tokenizer.json"])
        try:
            return Backend.from_str(pipeline)
        except Exception as error:
            raise ValueError(f"cannot read tokenizer file {path['tokenizer.json']}: {error}") from error
    if paths.is_file(path["vocab.txt"]):
        return wordpiece(path["vocab.txt"], config)
    if paths.is_file(path["vocab.json"]) and paths.is_file(path["merges.txt"]):
        return byte_level_bpe(path["vocab.json"], path["merges.txt"], config)
    raise FileNotFoundError(
        f"no tokenizer files in {folder}: looked for tokenizer.json, vocab.txt (WordPiece) "
        "and vocab.json + merges.txt (byte-level BPE)"
    )


def wordpiece(vocab_path: str, config: dict) -> Backend:
    """BERT's pipeline, as transformers' BertTokenizer(Fast) builds it."""
    lines = read_text(vocab_path).split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    vocab = {line: index for index, line in enumerate(lines)}
    unk = token_content(config.get("unk_token", "[UNK]"))
    backend = Backend(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls = token_content(config.get("cls_token", "[CLS]"))
    sep = token_content(config.get("sep_token", "[SEP]"))
    missing = [token for token in (cls, sep) if token not in vocab]
    if missing:
        raise ValueError(f"{vocab_path} lacks the special token(s) {missing}")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def byte_level_bpe(vocab_path: str, merges_path: str, config: dict) -> Backend:
    """GPT-2's pipeline, as transformers' GPT2Tokenizer(Fast) builds it."""
    vocab = read_json(vocab_path)
    merges = []
    lines = read_text(merges_path).split("\n")
    for number, line in enumerate(lines, 1):
        if line.startswith("#version") or not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{merges_path} line {number}: expected two space-separated tokens, got {line!r}")
        merges.append(tuple(pair))
    backend = Backend(
        models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config.get("add_prefix_space", False))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def roberta_processing(backend: Backend, special_tokens: dict, config: dict) -> processors.RobertaProcessing:
    """``<s> $A </s>`` as transformers' RobertaTokenizer / BartTokenizer add it."""
    cls, sep = special_tokens["cls"], special_tokens["sep"]
    if cls is None or sep is None or backend.token_to_id(cls) is None or backend.token_to_id(sep) is None:
        raise ValueError(
            f"{config['tokenizer_class']} needs cls and sep tokens in the vocabulary, got {cls!r} and {sep!r}"
        )
    return processors.RobertaProcessing(
        (sep, backend.token_to_id(sep)),
        (cls, backend.token_to_id(cls)),
        trim_offsets=True,
        add_prefix_space=config.get("add_prefix_space", False),
    )
