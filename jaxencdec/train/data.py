"""Source/target pairs from JSONL / TSV / CSV files or the ``aclsum`` package, tokenized to static shapes, in
a deterministic order that does not depend on how many processes read it.

Order: epoch ``e`` visits the examples in ``permutation(seed, e)``; global batch ``b`` is rows
``b*B ... (b+1)*B`` of it and process ``p`` of ``P`` takes the ``B/P`` rows ``p*B/P ...`` of each global batch,
so one process with 8 devices and two with 4 see the same global batches. A loader's position is
``{"epoch", "batch"}``: saved in checkpoints, restored with ``set_state``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

FORMATS = ("jsonl", "tsv", "csv", "aclsum")


class DataError(ValueError):
    """A data file is missing or malformed, or a field is absent."""


@dataclass(frozen=True)
class DataConfig:
    """Where the pairs come from and how they are cut.

    format: ``jsonl`` | ``tsv`` | ``csv`` | ``aclsum`` (the ``aclsum`` package's jsonl; files default to its
      ``train``/``val`` splits, fields to the abstract and the title).
    source_field, target_field: JSON keys (dotted for nested objects, e.g. ``summary.challenge``; a list of
      strings, as ``sentences.abstract``, is joined with spaces) or TSV/CSV header names.
    max_source_length, max_target_length: token budgets (special tokens included; longer texts are cut).
    source_buckets: optional ascending source lengths; a batch is padded to the smallest bucket that holds
      its longest source (one compile per bucket) instead of to ``max_source_length``.
    seed, shuffle: the epoch permutation.
    max_examples: keep only the first N examples of each file (smoke runs).
    """

    format: str = "jsonl"
    train_file: str | None = None
    eval_file: str | None = None
    source_field: str | None = None
    target_field: str | None = None
    max_source_length: int = 512
    max_target_length: int = 128
    source_buckets: tuple[int, ...] | None = None
    seed: int = 0
    shuffle: bool = True
    max_examples: int | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "aclsum":
            object.__setattr__(self, "source_field", self.source_field or "sentences.abstract")
            object.__setattr__(self, "target_field", self.target_field or "title")
        if not self.source_field or not self.target_field:
            raise DataError("data.source_field and data.target_field are required")
        if self.max_source_length < 2 or self.max_target_length < 2:
            raise DataError("data.max_source_length and data.max_target_length must be >= 2")
        if self.source_buckets is not None:
            buckets = tuple(int(b) for b in self.source_buckets)
            if not buckets or list(buckets) != sorted(set(buckets)) or buckets[-1] > self.max_source_length:
                raise DataError("data.source_buckets must be strictly ascending and at most max_source_length")
            object.__setattr__(self, "source_buckets", buckets)

    def file(self, split: str) -> str | None:
        """The file of ``split`` ('train' or 'eval'), resolving the ``aclsum`` defaults."""
        path = self.train_file if split == "train" else self.eval_file
        if path is None and self.format == "aclsum":
            path = os.path.join(aclsum_dir(), "train.jsonl" if split == "train" else "val.jsonl")
        return path

    def check(self, need_eval: bool) -> None:
        """Raises ``DataError`` for a missing file (cheap; called before anything is compiled)."""
        for split in ("train", "eval") if need_eval else ("train",):
            path = self.file(split)
            if path is None:
                raise DataError(f"data.{split}_file is not set")
            if not os.path.isfile(path):
                raise DataError(f"data.{split}_file {path} does not exist")


def aclsum_dir() -> str:
    """The ``dataset`` folder of the ``aclsum`` package (``pip install --no-deps aclsum``)."""
    spec = importlib.util.find_spec("aclsum")
    if spec is None or spec.origin is None:
        raise DataError("data.format 'aclsum' needs the aclsum package: pip install --no-deps aclsum")
    return os.path.join(os.path.dirname(spec.origin), "dataset")


# ---------------------------------------------------------------------- reading


def _field(record: Any, path: str, where: str) -> str:
    value = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise DataError(f"{where}: no field {path!r}")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {path!r} is {type(value).__name__}, not text")
    return value


def read_pairs(config: DataConfig, split: str) -> list[tuple[str, str]]:
    """All ``(source, target)`` texts of a split's file."""
    path = config.file(split)
    if path is None or not os.path.isfile(path):
        raise DataError(f"data.{split}_file {path} does not exist")
    pairs = []
    if config.format in ("jsonl", "aclsum"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e})") from None
                where = f"{path}:{number}"
                pairs.append((_field(record, config.source_field, where), _field(record, config.target_field, where)))
                if config.max_examples and len(pairs) >= config.max_examples:
                    break
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if config.format == "tsv" else ",")
            for field in (config.source_field, config.target_field):
                if reader.fieldnames is None or field not in reader.fieldnames:
                    raise DataError(f"{path}: no column {field!r} in the header {reader.fieldnames}")
            for number, row in enumerate(reader, 2):
                pairs.append((row[config.source_field] or "", row[config.target_field] or ""))
                if config.max_examples and len(pairs) >= config.max_examples:
                    break
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


# ---------------------------------------------------------------------- tokenizing


class PairEncoder:
    """Texts -> the model's numpy inputs at static shapes.

    Labels are the target's tokens without a leading decoder-start token (BERT's ``[CLS]`` when it starts
    the decoder) and ending in ``end_token_id`` (``[SEP]`` / ``</s>`` / ``<|endoftext|>``), cut to
    ``max_target_length``; decoder inputs are the labels shifted right behind ``decoder_start_token_id``.
    """

    def __init__(self, tokenizer, decoder_tokenizer, max_source_length: int, max_target_length: int,
                 decoder_start_token_id: int, pad_token_id: int, end_token_id: int | None,
                 source_pad_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.decoder_tokenizer = decoder_tokenizer or tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.decoder_start_token_id = decoder_start_token_id
        self.pad_token_id = pad_token_id
        self.end_token_id = end_token_id
        self.source_pad_token_id = tokenizer.pad_token_id if source_pad_token_id is None else source_pad_token_id
        if self.source_pad_token_id is None:
            raise DataError("the source tokenizer has no pad token")

    def source_lengths(self, sources: Sequence[str]) -> list[list[int]]:
        out = self.tokenizer(list(sources), max_length=self.max_source_length, truncation=True, padding=False)
        return out["input_ids"]

    def __call__(self, sources: Sequence[str], targets: Sequence[str], source_length: int | None = None,
                 source_ids: list[list[int]] | None = None) -> dict[str, np.ndarray]:
        """Returns int32 ``input_ids``/``attention_mask [batch, source_length]`` and ``decoder_input_ids``/
        ``decoder_attention_mask``/``labels [batch, max_target_length]`` (labels -100 on padding)."""
        source_length = source_length or self.max_source_length
        ids = source_ids if source_ids is not None else self.source_lengths(sources)
        batch = len(ids)
        input_ids = np.full((batch, source_length), self.source_pad_token_id, np.int32)
        attention_mask = np.zeros((batch, source_length), np.int32)
        for row, seq in enumerate(ids):
            seq = seq[:source_length]
            input_ids[row, :len(seq)] = seq
            attention_mask[row, :len(seq)] = 1
        t_len = self.max_target_length
        raw = self.decoder_tokenizer(list(targets), padding=False)["input_ids"]
        labels = np.full((batch, t_len), -100, np.int32)
        for row, seq in enumerate(raw):
            seq = list(seq)
            if seq and seq[0] == self.decoder_start_token_id:
                seq = seq[1:]
            if self.end_token_id is not None:
                if not seq or seq[-1] != self.end_token_id:
                    seq.append(self.end_token_id)
                seq = seq[:t_len - 1] + [self.end_token_id] if len(seq) > t_len else seq
            seq = seq[:t_len]
            labels[row, :len(seq)] = seq
        decoder_input_ids = np.concatenate(
            [np.full((batch, 1), self.decoder_start_token_id, np.int32), labels[:, :-1]], axis=1)
        decoder_input_ids = np.where(decoder_input_ids == -100, self.pad_token_id, decoder_input_ids)
        n_labels = (labels != -100).sum(axis=1)
        decoder_attention_mask = (np.arange(t_len)[None, :] < np.maximum(n_labels, 1)[:, None]).astype(np.int32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": decoder_attention_mask, "labels": labels}


# ---------------------------------------------------------------------- iterating


class PairLoader:
    """Deterministic, resumable iterator of this process's rows of each global batch.

    Args:
      pairs: every ``(source, target)`` of the split (each process holds the list; it tokenizes only its rows).
      encoder: a ``PairEncoder``.
      global_batch: rows per global batch, over all processes.
      process_index, process_count: this process's slot; ``global_batch % process_count == 0``.
      train: True: shuffled per epoch from ``seed``, endless, incomplete last batch dropped.
        False: file order, one pass, the last batch filled up with copies of its first row whose ``weights``
        are 0 (so shapes stay static and every example is counted once).
      buckets: optional source-length buckets (see ``DataConfig.source_buckets``).
      length_agree: reduces the per-process longest source to the global one (multi-host bucketing); default
        max over ``jax.experimental.multihost_utils.process_allgather``.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], encoder: PairEncoder, global_batch: int,
                 process_index: int = 0, process_count: int = 1, *, train: bool = True, seed: int = 0,
                 shuffle: bool = True, buckets: Sequence[int] | None = None, length_agree=None):
        if global_batch % process_count:
            raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if train and len(pairs) < global_batch:
            raise DataError(f"the training file has {len(pairs)} examples, fewer than one batch of {global_batch}")
        self.pairs = list(pairs)
        self.encoder = encoder
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.train = train
        self.seed = seed
        self.shuffle = shuffle and train
        self.buckets = tuple(buckets) if buckets else None
        self.length_agree = length_agree
        self.epoch = 0
        self.batch = 0
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.pairs)
        return n // self.global_batch if self.train else -(-n // self.global_batch)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "num_examples": len(self.pairs)}

    def set_state(self, state: dict[str, int]) -> None:
        if state.get("num_examples", len(self.pairs)) != len(self.pairs):
            raise DataError(f"the checkpoint's data position is for {state['num_examples']} examples, but the "
                            f"file now has {len(self.pairs)}; the order would differ")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.pairs)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_per_epoch:
            if not self.train:
                raise StopIteration
            self.epoch, self.batch = self.epoch + 1, 0
        order = self._epoch_order()
        rows = order[self.batch * self.global_batch:(self.batch + 1) * self.global_batch]
        weights = np.ones(self.global_batch, np.float32)
        if len(rows) < self.global_batch:  # eval tail
            weights[len(rows):] = 0
            rows = np.concatenate([rows, np.full(self.global_batch - len(rows), rows[0])])
        start = self.process_index * self.local_batch
        local = rows[start:start + self.local_batch]
        weights = weights[start:start + self.local_batch]
        sources = [self.pairs[i][0] for i in local]
        targets = [self.pairs[i][1] for i in local]
        source_ids = self.encoder.source_lengths(sources)
        length = None
        if self.buckets:
            longest = max(len(s) for s in source_ids)
            if self.process_count > 1:
                longest = (self.length_agree or _global_max)(longest)
            length = next((b for b in self.buckets if b >= longest), self.encoder.max_source_length)
        out = self.encoder(sources, targets, length, source_ids)
        out["labels"] = np.where(weights[:, None] > 0, out["labels"], -100).astype(np.int32)
        out["weights"] = weights
        out["example_index"] = local.astype(np.int32)
        self.batch += 1
        return out


def _global_max(value: int) -> int:
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


HOST_ONLY_KEYS = ("example_index", "weights")  # kept on the host, never sent to devices
