"""Text <-> token-id conversion on top of the `tokenizers` library.

`Tokenizer.from_pretrained` reads a Hugging Face tokenizer folder (or Hub repo) in one of three formats,
in this priority: ``tokenizer.json``; WordPiece ``vocab.txt`` (BERT); byte-level BPE ``vocab.json`` +
``merges.txt`` (GPT-2, or RoBERTa/BART when ``tokenizer_config.json`` says so). The pipelines built from
the vocabulary files are those transformers builds, so ids and decoded strings match its fast tokenizers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as Backend

from jaxencdec import paths, storage
from jaxencdec.checkpoint.hub import hub_upload_error
from jaxencdec.tokenizer_files import (BYTE_LEVEL_DEFAULTS, ROBERTA_CLASSES, SPECIAL_TOKEN_NAMES, WORDPIECE_DEFAULTS,
                                       add_listed_tokens, build_backend, read_json, resolve_folder, roberta_processing,
                                       token_content)

OVERRIDABLE = {f"{name}_token" for name in SPECIAL_TOKEN_NAMES} | {
    "do_lower_case",
    "strip_accents",
    "tokenize_chinese_chars",
    "clean_up_tokenization_spaces",
    "add_prefix_space",
    "tokenizer_class",
    "model_max_length",
    "additional_special_tokens",
}
NO_LIMIT = 10**20  # a model_max_length at or above this means "no limit" (transformers writes int(1e30))
WRITTEN_NO_LIMIT = int(1e30)
# The class transformers' AutoTokenizer builds straight from tokenizer.json (transformers 4 and 5).
GENERIC_CLASS = "PreTrainedTokenizerFast"
# tokenizer_config.json entries that point at the files of the folder it was read from.
PATH_KEYS = ("name_or_path", "tokenizer_file", "vocab_file", "merges_file", "special_tokens_map_file")
RETURN_TENSORS = (None, "np", "jax")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens, with batching to numpy arrays.

    Args:
        backend: the `tokenizers.Tokenizer` pipeline; its own padding and truncation are switched off,
            because both are decided per call.
        special_tokens: maps "pad", "bos", "eos", "unk", "cls", "sep", "mask" to a token string or None.
            These and `additional_special_tokens`, where not yet in the backend's added vocabulary, are added as
            special tokens (never split, dropped by ``decode(skip_special_tokens=True)``).
        clean_up_tokenization_spaces: default for `decode` (transformers skips it for BPE models).
        model_max_length: the default `max_length` for truncation and ``padding="max_length"`` (None: none).
        tokenizer_config: the ``tokenizer_config.json`` entries it was read with (``tokenizer_class``,
            ``do_lower_case``...); ``save_pretrained`` writes them back, updated with the settings above.
    """

    def __init__(
        self,
        backend: Backend,
        special_tokens: dict[str, str | None],
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
        additional_special_tokens: Sequence[str] = (),
        tokenizer_config: Mapping[str, Any] | None = None,
    ):
        backend.no_padding()
        backend.no_truncation()
        self._lock = threading.Lock()  # held while a call sets the backend's truncation and encodes
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        named = [special_tokens.get(name) for name in SPECIAL_TOKEN_NAMES]
        backend.add_special_tokens(
            [
                AddedToken(token, special=True, normalized=False)
                for token in dict.fromkeys([*named, *additional_special_tokens])
                if token is not None and token not in added
            ]
        )
        self._backend = backend
        self._special_tokens = {name: special_tokens.get(name) for name in SPECIAL_TOKEN_NAMES}
        self.additional_special_tokens = list(additional_special_tokens)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_max_length = model_max_length
        self.tokenizer_config = dict(tokenizer_config or {})

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **overrides) -> Tokenizer:
        """Load from a local folder, a bucket URL (``gs://bucket/tokenizer``) or a Hugging Face Hub repo id.

        `overrides` replace `tokenizer_config.json` entries: ``pad_token`` (and the other ``*_token``
        names), ``do_lower_case``, ``strip_accents``, ``tokenize_chinese_chars``,
        ``clean_up_tokenization_spaces``, ``add_prefix_space``, ``tokenizer_class``, ``model_max_length``,
        ``additional_special_tokens``. ``added_tokens_decoder`` entries missing from ``vocab.txt`` /
        ``vocab.json`` are added at their listed ids, as transformers does.
        """
        unknown = set(overrides) - OVERRIDABLE
        if unknown:
            raise TypeError(f"unknown tokenizer override(s) {sorted(unknown)}; allowed: {sorted(OVERRIDABLE)}")
        folder = resolve_folder(os.fspath(path_or_hub_id))
        config = {
            **read_json(os.path.join(folder, "tokenizer_config.json"), missing_ok=True),
            **read_json(os.path.join(folder, "special_tokens_map.json"), missing_ok=True),
            **overrides,
        }
        backend = build_backend(folder, config)
        add_listed_tokens(backend, config.get("added_tokens_decoder") or {})
        defaults = WORDPIECE_DEFAULTS if isinstance(backend.model, models.WordPiece) else BYTE_LEVEL_DEFAULTS
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            key = f"{name}_token"
            if key in config:
                special_tokens[name] = token_content(config[key])
            else:
                present = [t for t in defaults.get(name, []) if backend.token_to_id(t) is not None]
                special_tokens[name] = present[0] if present else None
        if (config.get("tokenizer_class") or "").removesuffix("Fast") in ROBERTA_CLASSES:
            backend.post_processor = roberta_processing(backend, special_tokens, config)
        # transformers writes a huge model_max_length (int(1e30)) for "no limit".
        max_length = config.get("model_max_length")
        max_length = int(max_length) if max_length is not None and max_length < NO_LIMIT else None
        additional = [token_content(token) for token in config.get("additional_special_tokens") or ()]
        return cls(backend, special_tokens, bool(config.get("clean_up_tokenization_spaces", False)), max_length,
                   additional, config)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, str]:
        """Writes ``tokenizer.json`` (the whole pipeline) and ``tokenizer_config.json``, the files transformers 5
        writes; both ``Tokenizer.from_pretrained`` and transformers' ``AutoTokenizer.from_pretrained`` load the
        folder with the same ids. The config is the one read (``tokenizer_class``, ``do_lower_case``...) with this
        tokenizer's special tokens, ``model_max_length`` and ``clean_up_tokenization_spaces``; without a
        ``tokenizer_class`` it names ``PreTrainedTokenizerFast``, which transformers builds from tokenizer.json
        as is. ``save_directory`` is a local folder or a bucket URL (``gs://bucket/tokenizer``); each file is written
        atomically. Returns the two paths.
        """
        folder = paths.as_path(save_directory)
        if paths.is_file(folder):
            raise ValueError(f"save_directory {folder} is a file; pass a folder")
        with self._lock:
            self._backend.no_truncation()  # __call__ leaves its last truncation setting on the backend
            pipeline_json = self._backend.to_str(pretty=True)  # the bytes Backend.save writes
        pipeline, config = folder / "tokenizer.json", folder / "tokenizer_config.json"
        storage.write_text(pipeline_json, pipeline)
        storage.write_json(self._config_to_save(), config)
        return str(pipeline), str(config)

    def _config_to_save(self) -> dict[str, Any]:
        """``tokenizer_config.json``: the entries read, minus paths to the old folder, with the current settings."""
        config = {k: v for k, v in self.tokenizer_config.items() if k not in PATH_KEYS}
        config.setdefault("tokenizer_class", GENERIC_CLASS)
        for name, token in self._special_tokens.items():
            key = f"{name}_token"
            if token is not None and token_content(config.get(key)) != token:  # keeps {"content", "lstrip"...}
                config[key] = token
        config.pop("additional_special_tokens", None)
        if self.additional_special_tokens:
            config["additional_special_tokens"] = list(self.additional_special_tokens)
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        config["model_max_length"] = WRITTEN_NO_LIMIT if self.model_max_length is None else self.model_max_length
        return config

    def push_to_hub(self, repo_id: str | None = None, *args, **kwargs):
        """Not implemented: raises NotImplementedError with the two calls that do it (``save_pretrained``, then
        ``huggingface_hub.upload_folder``). Takes transformers' arguments so that any such call gets that message."""
        raise hub_upload_error("tokenizer", repo_id)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included; valid ids are ``0 .. vocab_size - 1``."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def __len__(self) -> int:
        """``vocab_size``, as ``len(tokenizer)`` counts in transformers."""
        return self.vocab_size

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """The token of each id (transformers' name); one id gives one token."""
        if isinstance(ids, (int, np.integer)):
            return self._backend.id_to_token(int(ids))
        special = set()
        if skip_special_tokens:
            tokens = [*self._special_tokens.values(), *self.additional_special_tokens]
            special = {self._backend.token_to_id(t) for t in tokens if t is not None}
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in special]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """The id of each token (transformers' name); one token gives one id."""
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    def _special_id(self, name: str) -> int | None:
        token = self._special_tokens[name]
        return None if token is None else self._backend.token_to_id(token)

    pad_token_id = property(lambda self: self._special_id("pad"))
    bos_token_id = property(lambda self: self._special_id("bos"))
    eos_token_id = property(lambda self: self._special_id("eos"))
    unk_token_id = property(lambda self: self._special_id("unk"))
    cls_token_id = property(lambda self: self._special_id("cls"))
    sep_token_id = property(lambda self: self._special_id("sep"))
    mask_token_id = property(lambda self: self._special_id("mask"))

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        truncation: bool = False,
        padding: bool | str = "longest",
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        text_target: str | Sequence[str] | None = None,
    ) -> dict:
        """Encode one text or a batch of texts; with ``text_target`` also the targets, as ``labels`` encoded the
        same way (transformers' seq2seq habit; pad ids stay pad ids, as there).

        Args:
            texts: a string (treated as a batch of one) or a sequence of strings.
            max_length: the length for ``padding="max_length"`` and ``truncation=True`` (default: the
                tokenizer's ``model_max_length``).
            truncation: cut each sequence to `max_length` tokens, special tokens included (these are kept).
            padding: "longest" (or True) pads to the longest sequence in the batch, "max_length" pads to
                `max_length`, False / "do_not_pad" does not pad. Padding is on the right with `pad_token_id`.
            add_special_tokens: add the format's special tokens (e.g. BERT's [CLS] ... [SEP]).
            return_tensors: None (the default): numpy int32 arrays, or lists without padding; "np": numpy int64
                arrays, as transformers returns; "jax": jax int32 arrays. "pt" (PyTorch) is not supported: an error.
                With a tensor type and no padding, the sequences must all have the same length.

        Returns:
            ``{"input_ids", "attention_mask"}``: arrays of shape ``[batch, length]`` (attention_mask is 1 on
            tokens, 0 on padding); without padding and tensor type, lists of ``batch`` int lists. With
            ``text_target`` also ``"labels"``: the targets' ids, padded and truncated the same way.
        """
        if text_target is not None:
            encoded = self(texts, max_length, truncation, padding, add_special_tokens, return_tensors)
            encoded["labels"] = self(text_target, max_length, truncation, padding, add_special_tokens,
                                     return_tensors)["input_ids"]
            return encoded
        if return_tensors not in RETURN_TENSORS:
            hint = " (PyTorch tensors: jaxencdec models take numpy or JAX arrays)" if return_tensors == "pt" else ""
            raise ValueError(f"return_tensors={return_tensors!r} is not supported{hint}; use 'np' (numpy int64, as "
                             "transformers), 'jax' (jax int32) or None (numpy int32)")
        batch = [texts] if isinstance(texts, str) else list(texts)
        if max_length is None:
            max_length = self.model_max_length
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError("max_length is required for truncation=True and padding='max_length' "
                             "(this tokenizer has no model_max_length)")
        with self._lock:  # the truncation setting lives on the backend, which other threads may share
            if truncation:
                self._backend.enable_truncation(max_length)
            else:
                self._backend.no_truncation()
            encodings = self._backend.encode_batch(batch, add_special_tokens=add_special_tokens)
        ids = [encoding.ids for encoding in encodings]

        if padding in (False, "do_not_pad"):
            if return_tensors is None:
                return {"input_ids": ids, "attention_mask": [[1] * len(seq) for seq in ids]}
            if len(set(map(len, ids))) > 1:
                raise ValueError(f"return_tensors={return_tensors!r} needs sequences of one length, but padding=False "
                                 "left them ragged; pass padding=True (or 'max_length' with truncation=True)")
            length = len(ids[0]) if ids else 0
        elif padding in (True, "longest"):
            length = max(map(len, ids), default=0)
        elif padding == "max_length":
            length = max_length
            too_long = [len(seq) for seq in ids if len(seq) > length]
            if too_long:
                raise ValueError(
                    f"a sequence has {max(too_long)} tokens, more than max_length={length}; pass truncation=True"
                )
        else:
            raise ValueError(f"padding must be 'longest', 'max_length', True or False, got {padding!r}")
        if self.pad_token_id is None and any(len(seq) < length for seq in ids):
            raise ValueError(
                "padding is needed but this tokenizer has no pad token; "
                "pass e.g. pad_token=<eos token> to Tokenizer.from_pretrained"
            )
        input_ids = np.full((len(ids), length), self.pad_token_id or 0, dtype=np.int32)
        attention_mask = np.zeros((len(ids), length), dtype=np.int32)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            attention_mask[row, : len(seq)] = 1
        return {"input_ids": _as_tensors(input_ids, return_tensors),
                "attention_mask": _as_tensors(attention_mask, return_tensors)}

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Turn one sequence of ids (list, numpy or jax array of shape ``[length]``) back into text.

        `skip_special_tokens` drops the special tokens ([CLS], [SEP], padding, ...); as in transformers they are
        kept by default.
        `clean_up_tokenization_spaces` (None: the tokenizer's default) removes spaces before punctuation
        and contractions, as transformers does; like transformers, it is never applied to BPE models.
        Raises ValueError for ids outside ``0 .. vocab_size - 1``.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"decode expects a 1-D sequence of integer ids, got shape {ids.shape} {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range [0, {self.vocab_size})")
        text = self._backend.decode(ids.astype(np.int64).tolist(), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces and not isinstance(self._backend.model, models.BPE):
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(
        self,
        sequences,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """`decode` each row of `sequences` (an int array ``[batch, length]`` or a list of id lists)."""
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]


def _as_tensors(array: np.ndarray, return_tensors: str | None):
    """An int32 ``[batch, length]`` array as ``return_tensors`` asks: None: as is; "np": int64 (transformers'
    dtype); "jax": a jax int32 array."""
    if return_tensors == "np":
        return array.astype(np.int64)
    if return_tensors == "jax":
        import jax.numpy as jnp  # only when asked: the tokenizer needs no JAX otherwise

        return jnp.asarray(array)
    return array


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the spaces the tokenizer put before punctuation."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
