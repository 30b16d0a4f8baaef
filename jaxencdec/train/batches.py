"""Pairs -> the model's batches: ``PairEncoder`` tokenizes texts to static shapes, ``PairLoader`` and
``ShardLoader`` yield this process's rows of each global batch in a deterministic, resumable order.

Order: epoch ``e`` visits the examples in ``permutation(seed, e)``; global batch ``b`` is rows
``b*B ... (b+1)*B`` of it and process ``p`` of ``P`` takes the ``B/P`` rows ``p*B/P ...`` of each global batch,
so one process with 8 devices and two with 4 see the same global batches. A loader's position is
``{"epoch", "batch"}``: saved in checkpoints, restored with ``set_state``.

With ``data.streaming`` each process instead draws its rows of every batch from its own shard of the file
(``read_shard``, ``ShardLoader``): memory and reading per process fall with the process count, and the batches
depend on it.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

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
        if "packed" in state:
            raise DataError("the checkpoint's data position is one of packed rows (data.packing was true); set "
                            "data.packing to true again to resume from it")
        if "processes" in state:
            raise DataError("the checkpoint's data position is one per process (data.streaming was true); set "
                            "data.streaming to true again to resume from it")
        if state.get("num_examples", len(self.pairs)) != len(self.pairs):
            raise DataError(f"the checkpoint's data position is for {state['num_examples']} examples, but the "
                            f"file now has {len(self.pairs)}; the order would differ")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _shuffle_seed(self) -> list[int]:
        """The seed of the current epoch's permutation."""
        return [self.seed, self.epoch]

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.pairs)
            self._order = (np.random.default_rng(self._shuffle_seed()).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _local_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the current batch (indices into ``pairs``) and their float32 weights."""
        order = self._epoch_order()
        rows = order[self.batch * self.global_batch:(self.batch + 1) * self.global_batch]
        weights = np.ones(self.global_batch, np.float32)
        if len(rows) < self.global_batch:  # eval tail
            weights[len(rows):] = 0
            rows = np.concatenate([rows, np.full(self.global_batch - len(rows), rows[0])])
        start = self.process_index * self.local_batch
        return rows[start:start + self.local_batch], weights[start:start + self.local_batch]

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_per_epoch:
            if not self.train:
                raise StopIteration
            self.epoch, self.batch = self.epoch + 1, 0
        local, weights = self._local_rows()
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


class ShardLoader(PairLoader):
    """Training batches from this process's shard of the file (``read_shard``): endless, resumable.

    Each step, every process takes ``global_batch / process_count`` rows of its own shard, in the order
    ``permutation(seed, epoch, process_index)`` of the shard (file order without ``shuffle``); a shard's
    epoch ends when fewer rows than that remain (dropped, as the whole-file loader drops an incomplete batch),
    so processes with shards of different sizes start new epochs at different steps. The global batch is
    the processes' rows together. It is not the whole-file loader's global batch, and it changes with the number
    of processes (the shards do). The position ``{"processes": [{"epoch", "batch", "num_examples"}, ...]}``
    holds every process's (gathered with ``state_gather``, default
    ``jax.experimental.multihost_utils.process_allgather``, so ``get_state`` is collective); ``set_state`` takes
    this process's entry back and refuses another process count or a changed shard.
    """

    def __init__(self, shard: Sequence[tuple[str, str]], encoder: PairEncoder, global_batch: int,
                 process_index: int = 0, process_count: int = 1, *, seed: int = 0, shuffle: bool = True,
                 buckets: Sequence[int] | None = None, length_agree=None, state_gather=None):
        if global_batch % process_count:
            raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if len(shard) < global_batch // process_count:
            raise DataError(f"the training file's share of process {process_index} of {process_count} has "
                            f"{len(shard)} examples, fewer than its {global_batch // process_count} rows of one "
                            f"batch; use a larger file or fewer processes")
        super().__init__(shard, encoder, global_batch // process_count, train=True, seed=seed, shuffle=shuffle,
                         buckets=buckets, length_agree=length_agree)
        self.local_batch = global_batch // process_count
        self.process_index, self.process_count = process_index, process_count
        self.state_gather = state_gather

    def _shuffle_seed(self) -> list[int]:
        return [self.seed, self.epoch, self.process_index]

    def _local_rows(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._epoch_order()[self.batch * self.local_batch:(self.batch + 1) * self.local_batch]
        return rows, np.ones(self.local_batch, np.float32)

    def get_state(self) -> dict[str, list[dict[str, int]]]:
        mine = np.asarray([self.epoch, self.batch, len(self.pairs)], np.int64)
        rows = (self.state_gather or _gather)(mine) if self.process_count > 1 else mine[None]
        return {"processes": [{"epoch": int(e), "batch": int(b), "num_examples": int(n)} for e, b, n in rows]}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("processes")
        if saved is None:
            raise DataError("the checkpoint's data position is for the whole file (data.streaming was false); set "
                            "data.streaming to false again to resume from it")
        if len(saved) != self.process_count:
            raise DataError(f"the checkpoint's data position was saved by {len(saved)} processes, this run has "
                            f"{self.process_count}: each reads another share of the file; resume with "
                            f"{len(saved)} processes")
        super().set_state(saved[self.process_index])


def _gather(row: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row))


def _global_max(value: int) -> int:
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


class Prefetched:
    """``loader``'s batches, each read (and ``prepare``d, e.g. placed on the devices) on a thread of its own while
    the caller works on the one before: ``next`` returns ``(batch, prepare(batch))``. With ``ahead`` False they are
    read when asked for: with several processes, whose loaders may gather across processes (bucketing), so that
    every process issues its collectives in the same order.

    ``get_state`` is the position after the batches returned so far (the one read ahead does not count), so a
    checkpoint taken between steps resumes exactly; ``set_state`` drops the batch read ahead. An error of a read
    is raised by the ``next`` that would have returned its batch. ``close`` stops the thread.
    """

    def __init__(self, loader, prepare, ahead: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.loader, self._prepare = loader, prepare
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="jaxencdec-data") if ahead else None
        self._ahead = None  # (the loader's position before the batch being read, its future)

    def _read(self):
        batch = next(self.loader)
        return batch, self._prepare(batch)

    def _read_ahead(self) -> None:
        self._ahead = (self.loader.get_state(), self._thread.submit(self._read))

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return self._read()
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
        if self._thread is not None:
            self._thread.shutdown(wait=True)
