"""Packed training rows (``data.packing``): several examples per row, built by a grain pipeline.

The global stream is the same on every process: the examples in ``permutation(seed, epoch)`` (grain's global
shuffle, another permutation each epoch), tokenized, and packed first-fit into bins of ``max_source_length``
source and ``max_target_length`` target tokens (``grain.experimental.FirstFitPackIterDataset`` with
``BINS_PER_ROW`` bins per row of the global batch: when an example fits in no bin, the bins become the next
global batches, in order). Process ``p`` of
``P`` takes rows ``p * B/P ...`` of each global batch, so one process and several see the same global batches,
and a run resumes on any number of processes. Each process packs the whole global batch, which tokenizes every
example on every process. The position is grain's iterator state, saved in checkpoints.

A packed batch holds what ``PairEncoder`` returns, padded rows being segment 0, plus ``step.PACKED_KEYS``:
``encoder_segment_ids`` / ``decoder_segment_ids`` (which example each token belongs to, from 1 in each row; 0 on
padding) and ``encoder_positions`` / ``decoder_positions`` (each token's position in its example, from 0).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import numpy as np

from jaxencdec.train.batches import PairEncoder
from jaxencdec.train.data import DataError

# Open bins per row of the global batch: the more an example can choose from, the fuller the rows (on ACLSum's
# abstracts in rows of 512 + 64 tokens, batch 4: 85% of the token slots hold tokens with 1, 91% with 8).
BINS_PER_ROW = 8


class PackedLoader:
    """Endless, resumable iterator of this process's packed rows of each global batch (see the module docstring).

    Args:
      pairs: every ``(source, target)`` of the training split.
      encoder: a ``PairEncoder`` (its ``max_source_length`` / ``max_target_length`` are the rows' lengths).
      global_batch: rows per global batch, over all processes; process_index, process_count: this process's slot.
      seed, shuffle: the epoch permutation (file order without ``shuffle``).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], encoder: PairEncoder, global_batch: int,
                 process_index: int = 0, process_count: int = 1, *, seed: int = 0, shuffle: bool = True):
        if global_batch % process_count:
            raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if not pairs:
            raise DataError("the training file has no examples")
        self.pairs = list(pairs)
        self.encoder = encoder
        self.local_batch = global_batch // process_count
        self.first_row = process_index * self.local_batch
        order = grain.MapDataset.range(len(self.pairs))
        if shuffle:
            order = order.shuffle(seed=seed)
        examples = order.repeat(None).map(self._tokenized).to_iter_dataset()
        lengths = {"input_ids": encoder.max_source_length, "decoder_input_ids": encoder.max_target_length,
                   "labels": encoder.max_target_length}
        packed = grain.experimental.FirstFitPackIterDataset(examples, length_struct=lengths,
                                                            num_packing_bins=BINS_PER_ROW * global_batch,
                                                            shuffle_bins=False)
        self._dataset = packed.batch(global_batch, drop_remainder=True)
        self._iterator = iter(self._dataset)

    def _tokenized(self, index: int) -> dict[str, np.ndarray]:
        source, target = self.pairs[index]
        enc = self.encoder
        labels = enc.target_ids([target])[0]
        return {"input_ids": np.asarray(enc.source_lengths([source])[0], np.int32),
                "decoder_input_ids": np.asarray(([enc.decoder_start_token_id] + labels)[:len(labels)], np.int32),
                "labels": np.asarray(labels, np.int32)}

    def get_state(self) -> dict[str, Any]:
        return {"packed": self._iterator.get_state(), "num_examples": len(self.pairs)}

    def set_state(self, state: dict[str, Any]) -> None:
        if "packed" not in state:
            raise DataError("the checkpoint's data position is one of unpacked batches (data.packing was false); "
                            "set data.packing to false again to resume from it")
        if state["num_examples"] != len(self.pairs):
            raise DataError(f"the checkpoint's data position is for {state['num_examples']} examples, but the "
                            f"file now has {len(self.pairs)}; the order would differ")
        self._iterator = iter(self._dataset)
        self._iterator.set_state(state["packed"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = {k: np.asarray(v)[self.first_row:self.first_row + self.local_batch]
                for k, v in next(self._iterator).items()}
        source, target = rows["input_ids_segment_ids"], rows["labels_segment_ids"]
        enc = self.encoder
        decoder_inputs = np.where(target > 0, rows["decoder_input_ids"], enc.pad_token_id)
        return {"input_ids": np.where(source > 0, rows["input_ids"], enc.source_pad_token_id).astype(np.int32),
                "attention_mask": (source > 0).astype(np.int32),
                "decoder_input_ids": decoder_inputs.astype(np.int32),
                "decoder_attention_mask": (target > 0).astype(np.int32),
                "labels": np.where(target > 0, rows["labels"], -100).astype(np.int32),
                "encoder_segment_ids": source.astype(np.int32),
                "encoder_positions": rows["input_ids_positions"].astype(np.int32),
                "decoder_segment_ids": target.astype(np.int32),
                "decoder_positions": rows["labels_positions"].astype(np.int32)}


def token_counts(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """``(real tokens, token slots)`` of a batch: source tokens plus counted labels, and ``rows * (src + tgt)``."""
    real = int(np.sum(batch["attention_mask"])) + int(np.sum(batch["labels"] != -100))
    return real, batch["input_ids"].size + batch["labels"].size


def token_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Real tokens / token slots of a batch (``token_counts``)."""
    real, slots = token_counts(batch)
    return real / slots
