"""Texts -> the model's batches: ``PairEncoder`` tokenizes pairs to static shapes; ``Prefetched`` reads a batch
iterator's next batch (and places it on the devices) while the step before runs. The order of the batches is
:mod:`jaxencdec.train.pipeline`'s.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxencdec.train.data import DataError

HOST_ONLY_KEYS = ("example_index", "weights")  # kept on the host, never sent to devices


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

    def target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """Each target's labels: its tokens without a leading decoder-start token, ending in ``end_token_id``,
        at most ``max_target_length``."""
        t_len, out = self.max_target_length, []
        for seq in self.decoder_tokenizer(list(targets), padding=False)["input_ids"]:
            seq = list(seq)
            if seq and seq[0] == self.decoder_start_token_id:
                seq = seq[1:]
            if self.end_token_id is not None:
                if not seq or seq[-1] != self.end_token_id:
                    seq.append(self.end_token_id)
                seq = seq[:t_len - 1] + [self.end_token_id] if len(seq) > t_len else seq
            out.append(seq[:t_len])
        return out

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
        labels = np.full((batch, t_len), -100, np.int32)
        for row, seq in enumerate(self.target_ids(targets)):
            labels[row, :len(seq)] = seq
        decoder_input_ids = np.concatenate(
            [np.full((batch, 1), self.decoder_start_token_id, np.int32), labels[:, :-1]], axis=1)
        decoder_input_ids = np.where(decoder_input_ids == -100, self.pad_token_id, decoder_input_ids)
        n_labels = (labels != -100).sum(axis=1)
        decoder_attention_mask = (np.arange(t_len)[None, :] < np.maximum(n_labels, 1)[:, None]).astype(np.int32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": decoder_attention_mask, "labels": labels}


class Prefetched:
    """``loader``'s batches, each read (and ``prepare``d, e.g. placed on the devices) on a thread of its own while
    the caller works on the one before: ``next`` returns ``(batch, prepare(batch))``.

    ``get_state`` is the position after the batches returned so far (the one read ahead does not count), so a
    checkpoint taken between steps resumes exactly; ``set_state`` drops the batch read ahead. An error of a read
    is raised by the ``next`` that would have returned its batch. ``close`` stops the thread.
    """

    def __init__(self, loader, prepare):
        from concurrent.futures import ThreadPoolExecutor

        self.loader, self._prepare = loader, prepare
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="jaxencdec-data")
        self._ahead = None  # (the loader's position before the batch being read, its future)

    def _read(self):
        batch = next(self.loader)
        return batch, self._prepare(batch)

    def _read_ahead(self) -> None:
        self._ahead = (self.loader.get_state(), self._thread.submit(self._read))

    def __iter__(self):
        return self

    def __next__(self):
        if self._ahead is None:
            self._read_ahead()
        result = self._ahead[1].result()
        self._read_ahead()
        return result

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            future = self._ahead[1]
            if not future.cancel():
                future.exception()  # waits for the read in flight; its error no longer matters
            self._ahead = None

    def get_state(self) -> dict[str, Any]:
        return self._ahead[0] if self._ahead is not None else self.loader.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._drop_ahead()
        self.loader.set_state(state)

    def close(self) -> None:
        self._drop_ahead()
        self._thread.shutdown(wait=True)
