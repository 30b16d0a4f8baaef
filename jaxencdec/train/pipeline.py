"""The training and eval batches: one grain pipeline over a split's pairs (``data.open_pairs``, random access).

Order. Training reads the endless stream of example indices ``permutation(seed, epoch)`` (grain's global shuffle,
another permutation each epoch; file order without ``data.shuffle``). Global batch ``g`` is the stream's items
``g*B ... (g+1)*B`` (a batch may span two epochs), and process ``p`` of ``P`` reads and tokenizes only its rows
``g*B + p*B/P ...`` of it: the global batches are the same on any number of processes, and no process waits on
another (with ``data.source_buckets`` each process tokenizes the global batch's sources to find its length).
Packed rows (:mod:`jaxencdec.train.packing`) are packed from the whole stream on every process. Eval reads the
split once in order, its last batch filled up with copies of a row whose ``weights`` are 0.

Position. grain's iterator state (the next global batch; per worker with ``data.workers``): the same on every
process, saved in every checkpoint, restored on any number of processes.

Workers. With ``data.workers`` W > 0, reading and tokenizing run in W grain worker processes (``mp_prefetch``):
worker w makes global batches w, w+W, ... (packed: tokenizes examples w, w+W, ... of the stream), and the batches
are those of W = 0.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import numpy as np

from jaxencdec.train import packing
from jaxencdec.train.batches import PairEncoder
from jaxencdec.train.data import DataError

# Items made one at a time, when asked for (grain's default reads 500 ahead on 16 threads): the training loop reads
# one batch ahead itself (``batches.Prefetched``), and ``data.workers`` moves the work to other processes.
IN_ORDER = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

# Examples in the training stream: more than any run reads, and exact in float64 (grain's ``repeat(None)`` is
# sys.maxsize long, and its batching divides lengths as floats: with batches of one row that overflows).
STREAM_LENGTH = 2 ** 52


class LocalRows:
    """A grain map: a global batch's example indices -> this process's rows of it, tokenized (``PairEncoder``'s
    arrays plus host-only ``weights`` float32 and ``example_index`` int32, ``[B/P]``). Picklable.

    Args:
      pairs: the split's random-access ``(source, target)`` sequence.
      global_batch: B; a shorter index array (eval's last batch) is filled up with its first row at weight 0.
      rows: this process's rows of a global batch.
      buckets: ``data.source_buckets`` (the global batch's longest source picks the length), or None.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], encoder: PairEncoder, global_batch: int, rows: slice,
                 buckets: Sequence[int] | None):
        self.pairs, self.encoder, self.global_batch, self.rows = pairs, encoder, global_batch, rows
        self.buckets = tuple(buckets) if buckets else None

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        weights = np.ones(self.global_batch, np.float32)
        if len(indices) < self.global_batch:
            weights[len(indices):] = 0
            indices = np.concatenate([indices, np.full(self.global_batch - len(indices), indices[0])])
        mine, weights = indices[self.rows], weights[self.rows]
        pairs = [self.pairs[i] for i in mine]
        source_ids = self.encoder.source_lengths([source for source, _ in pairs])
        length = None
        if self.buckets:
            others = [self.pairs[i][0] for i in np.delete(indices, np.arange(self.global_batch)[self.rows])]
            longest = max(len(ids) for ids in source_ids + self.encoder.source_lengths(others))
            length = next((b for b in self.buckets if b >= longest), self.encoder.max_source_length)
        out = self.encoder([source for source, _ in pairs], [target for _, target in pairs], length, source_ids)
        out["labels"] = np.where(weights[:, None] > 0, out["labels"], -100).astype(np.int32)
        out["weights"] = weights
        out["example_index"] = mine.astype(np.int32)
        return out


class Batches:
    """Endless iterator of this process's training batches (numpy dicts) with grain's position: ``get_state`` /
    ``set_state`` (JSON-able; ``set_state`` refuses a position of another kind of rows, example count or worker
    count, naming the setting to restore). ``close`` stops the worker processes."""

    def __init__(self, dataset: grain.IterDataset, *, packed: bool, num_examples: int, workers: int):
        self._dataset, self.packed, self.num_examples, self.workers = dataset, packed, num_examples, workers
        self._iterator = iter(dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in next(self._iterator).items()}  # copies out of grain's shared memory

    def get_state(self) -> dict[str, Any]:
        return {"rows": "packed" if self.packed else "padded", "num_examples": self.num_examples,
                "workers": self.workers, "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "grain" not in state:
            raise DataError("the checkpoint's data position was written by an earlier jaxencdec, whose batches "
                            "were made otherwise; resume with that version, or start over in a new output_dir "
                            "(warm-start from the checkpoint's final_model)")
        if (state["rows"] == "packed") != self.packed:
            raise DataError(f"the checkpoint's data position is one of {state['rows']} rows (data.packing was "
                            f"{str(state['rows'] == 'packed').lower()}); set data.packing to "
                            f"{str(state['rows'] == 'packed').lower()} again to resume from it")
        if state["num_examples"] != self.num_examples:
            raise DataError(f"the checkpoint's data position is for {state['num_examples']} examples, but the "
                            f"file now has {self.num_examples}; the order would differ")
        if state["workers"] != self.workers:
            raise DataError(f"the checkpoint's data position is one of {state['workers']} data workers; set "
                            f"data.workers to {state['workers']} again to resume from it")
        self.close()
        self._iterator = iter(self._dataset)
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def training_batches(pairs: Sequence[tuple[str, str]], encoder: PairEncoder, global_batch: int,
                     process_index: int = 0, process_count: int = 1, *, seed: int = 0, shuffle: bool = True,
                     buckets: Sequence[int] | None = None, packed: bool = False, workers: int = 0) -> Batches:
    """This process's rows of every global batch of ``global_batch`` rows (see the module docstring)."""
    rows = _process_rows(global_batch, process_index, process_count)
    if len(pairs) < global_batch and not packed:
        raise DataError(f"the training file has {len(pairs)} examples, fewer than one global batch of "
                        f"{global_batch} (train.batch_size): lower train.batch_size, add examples or pack them "
                        f"(data.packing)")
    if not len(pairs):
        raise DataError("the training file has no examples")
    stream = grain.MapDataset.range(len(pairs))
    if shuffle:
        stream = stream.shuffle(seed=seed)
    stream = stream.repeat(max(1, STREAM_LENGTH // len(pairs)))
    if packed:
        examples = _in_workers(stream.map(packing.Tokenized(pairs, encoder)).to_iter_dataset(IN_ORDER), workers)
        dataset = packing.packed_rows(examples, encoder, global_batch, rows)
    else:
        batches = stream.batch(global_batch, batch_fn=np.asarray).map(LocalRows(pairs, encoder, global_batch,
                                                                                   rows, buckets))
        dataset = _in_workers(batches.to_iter_dataset(IN_ORDER), workers)
    return Batches(dataset, packed=packed, num_examples=len(pairs), workers=workers)


def eval_batches(pairs: Sequence[tuple[str, str]], encoder: PairEncoder, global_batch: int, process_index: int = 0,
                 process_count: int = 1, *, buckets: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch of one pass over ``pairs`` in order."""
    rows = _process_rows(global_batch, process_index, process_count)
    batches = grain.MapDataset.range(len(pairs)).batch(global_batch, batch_fn=np.asarray)
    return iter(batches.map(LocalRows(pairs, encoder, global_batch, rows, buckets)).to_iter_dataset(IN_ORDER))


def _process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def _in_workers(dataset: grain.IterDataset, workers: int) -> grain.IterDataset:
    """``dataset`` made by ``workers`` grain worker processes (0: as it is)."""
    if not workers:
        return dataset
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its absl flags in mp_prefetch; a program without absl has none
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
