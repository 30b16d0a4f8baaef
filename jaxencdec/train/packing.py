"""Packed training rows (``data.packing``): several examples per row, packed by grain.

The examples of the training stream (:mod:`jaxencdec.train.pipeline`), tokenized, are packed first-fit into bins of
``max_source_length`` source and ``max_target_length`` target tokens (``grain.experimental.FirstFitPackIterDataset``
with ``BINS_PER_ROW`` bins per row of the global batch: when an example fits in no bin, the bins become the next
global batches, in order). Every process packs the whole stream and keeps its rows of each global batch, so one
process and several see the same global batches, and a run resumes on any number of processes.

A packed batch holds what ``PairEncoder`` returns, padded rows being segment 0, plus ``step.PACKED_KEYS``:
``encoder_segment_ids`` / ``decoder_segment_ids`` (which example each token belongs to, from 1 in each row; 0 on
padding) and ``encoder_positions`` / ``decoder_positions`` (each token's position in its example, from 0).
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from jaxencdec.train.batches import PairEncoder

# Open bins per row of the global batch: the more an example can choose from, the fuller the rows (on ACLSum's
# abstracts in rows of 512 + 64 tokens, batch 4: 85% of the token slots hold tokens with 1, 91% with 8).
BINS_PER_ROW = 8


class Tokenized:
    """A grain map: an example index -> its unpadded int32 ``input_ids``, ``decoder_input_ids`` and ``labels``
    (the labels shifted right behind the decoder-start token). Picklable."""

    def __init__(self, pairs: Sequence[tuple[str, str]], encoder: PairEncoder):
        self.pairs, self.encoder = pairs, encoder

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        source, target = self.pairs[index]
        enc = self.encoder
        labels = enc.target_ids([target])[0]
        return {"input_ids": np.asarray(enc.source_lengths([source])[0], np.int32),
                "decoder_input_ids": np.asarray(([enc.decoder_start_token_id] + labels)[:len(labels)], np.int32),
                "labels": np.asarray(labels, np.int32)}


class ModelRows:
    """A grain map: a packed global batch -> this process's ``rows`` of it as the model's inputs."""

    def __init__(self, encoder: PairEncoder, rows: slice):
        self.encoder, self.rows = encoder, rows

    def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = {k: np.asarray(v)[self.rows] for k, v in packed.items()}
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


def packed_rows(examples: grain.IterDataset, encoder: PairEncoder, global_batch: int,
                rows: slice) -> grain.IterDataset:
    """``examples`` (``Tokenized``'s) packed into global batches of ``global_batch`` rows; this process's ``rows``."""
    lengths = {"input_ids": encoder.max_source_length, "decoder_input_ids": encoder.max_target_length,
               "labels": encoder.max_target_length}
    packed = grain.experimental.FirstFitPackIterDataset(examples, length_struct=lengths,
                                                        num_packing_bins=BINS_PER_ROW * global_batch,
                                                        shuffle_bins=False)
    return packed.batch(global_batch, drop_remainder=True).map(ModelRows(encoder, rows))


def token_counts(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """``(real tokens, token slots)`` of a batch: source tokens plus counted labels, and ``rows * (src + tgt)``."""
    real = int(np.sum(batch["attention_mask"])) + int(np.sum(batch["labels"] != -100))
    return real, batch["input_ids"].size + batch["labels"].size


def token_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Real tokens / token slots of a batch (``token_counts``)."""
    real, slots = token_counts(batch)
    return real / slots
