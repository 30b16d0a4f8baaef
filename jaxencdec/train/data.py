"""Where the source/target pairs come from: ``DataConfig`` and the readers of JSONL / TSV / CSV files, Hugging
Face ``datasets`` folders and Parquet files or the ``aclsum`` package (local paths or bucket URLs).

``read_pairs`` reads a split's whole file; with ``data.streaming`` each process reads only the JSONL lines that
start in its byte range of the training file (``read_shard``). :mod:`jaxencdec.train.batches` tokenizes the
pairs and orders them into batches.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Iterator

from jaxencdec import paths

FORMATS = ("jsonl", "tsv", "csv", "aclsum", "hf")
# the split a folder saved from a DatasetDict (save_to_disk) is read at, for data.train_file / data.eval_file
HF_SPLITS = {"train": ("train",), "eval": ("validation", "test")}


class DataError(ValueError):
    """A data file is missing or malformed, or a field is absent."""


@dataclass(frozen=True)
class DataConfig:
    """Where the pairs come from and how they are cut.

    format: ``jsonl`` | ``tsv`` | ``csv`` | ``aclsum`` (the ``aclsum`` package's jsonl; files default to its
      ``train``/``val`` splits, fields to the abstract and the title) | ``hf`` (a Hugging Face ``datasets``
      folder written by ``save_to_disk``, of a ``Dataset`` or of a ``DatasetDict``, whose ``train`` split is
      the training data and ``validation`` (else ``test``) the eval data; or a ``.parquet`` file).
    source_field, target_field: JSON keys (dotted for nested objects, e.g. ``summary.challenge``; a list of
      strings, as ``sentences.abstract``, is joined with spaces), TSV/CSV header names or dataset column names
      (dotted for struct columns).
    max_source_length, max_target_length: token budgets (special tokens included; longer texts are cut).
    source_buckets: optional ascending source lengths; a batch is padded to the smallest bucket that holds
      its longest source (one compile per bucket) instead of to ``max_source_length``.
    seed, shuffle: the epoch permutation.
    max_examples: keep only the first N examples of each file (smoke runs).
    streaming: JSONL training data read per process: each process reads only the lines that start in its
      1/P byte range of the file (see ``read_shard`` and ``batches.ShardLoader``); the eval file is read whole.
    packing: training rows hold several examples each (``max_source_length`` source and ``max_target_length``
      target tokens per row, first-fit, with segment ids and per-example positions; see ``packing.PackedLoader``)
      instead of one example padded; eval batches stay unpacked.
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
    streaming: bool = False
    packing: bool = False

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
        if self.streaming and self.format not in ("jsonl", "aclsum"):
            raise DataError(f"data.streaming reads JSONL files by byte ranges; data.format is {self.format!r}: "
                            f"convert the file to JSONL or set data.streaming to false")
        if self.streaming and self.max_examples:
            raise DataError("data.max_examples needs the whole file, data.streaming reads a share of it: set one")
        if self.packing and self.streaming:
            raise DataError("data.packing packs the whole file's examples, data.streaming reads a share of it per "
                            "process: set one of them to false")
        if self.packing and self.source_buckets:
            raise DataError("packed rows are max_source_length long: data.source_buckets does not apply; remove it "
                            "or set data.packing to false")
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
            if not (paths.exists(path) if self.format == "hf" else paths.is_file(path)):
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
    """All ``(source, target)`` texts of a split's file (a local path or a bucket URL such as ``gs://b/train.jsonl``).

    Raises:
        DataError: the file is missing, is not UTF-8 text, holds invalid JSON or lacks a field or column; the
            message names the file and the line.
    """
    path = config.file(split)
    if config.format == "hf":
        return _hf_pairs(path, split, config)
    if path is None or not paths.is_file(path):
        raise DataError(f"data.{split}_file {path} does not exist")
    with _open_binary(path) as f:
        if config.format in ("jsonl", "aclsum"):
            pairs = _jsonl_pairs(path, ((f":{number}", raw) for number, raw in enumerate(f, 1)), config)
        else:
            pairs = _read_table(f, path, config)
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


def read_shard(config: DataConfig, split: str, process_index: int, process_count: int) -> list[tuple[str, str]]:
    """The ``(source, target)`` texts of the JSONL lines that start in byte range ``[size*p/P, size*(p+1)/P)``
    of the split's file, in file order; ``size`` comes from one seek, not a read.

    Every line belongs to exactly one process, and the shards of processes ``0..P-1`` concatenated are
    ``read_pairs``'s list. A process reads its range, plus the rest of the one line that crosses its end and the
    byte before its start (to find its first line start). Errors name the byte offset of the line.
    """
    path = config.file(split)
    if path is None or not paths.is_file(path):
        raise DataError(f"data.{split}_file {path} does not exist")
    with _open_binary(path) as f:
        size = f.seek(0, os.SEEK_END)
        start, end = size * process_index // process_count, size * (process_index + 1) // process_count
        pairs = _jsonl_pairs(path, ((f" (the line at byte {offset})", raw)
                                    for offset, raw in _lines_starting_in(f, start, end)), config)
    if not pairs:
        raise DataError(f"{path}: no example starts in bytes {start}..{end} of {size}, the share of process "
                        f"{process_index} of {process_count}; use a larger file or fewer processes")
    return pairs


def _hf_pairs(path: str | None, split: str, config: DataConfig) -> list[tuple[str, str]]:
    """The pairs of a ``save_to_disk`` folder or a Parquet file (``data.format: "hf"``); fields are column
    names, dotted for struct columns."""
    if path is None or not paths.exists(path):
        raise DataError(f"data.{split}_file {path} does not exist")
    columns = sorted({config.source_field.split(".")[0], config.target_field.split(".")[0]})
    table = _parquet_table(path) if paths.is_file(path) else _saved_dataset(path, split).with_format("arrow")[:]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; the columns are {table.column_names}")
    rows = table.select(columns).slice(0, config.max_examples or None).to_pylist()
    pairs = [(_field(row, config.source_field, f"{path} row {i}"), _field(row, config.target_field, f"{path} row {i}"))
             for i, row in enumerate(rows)]
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


def _parquet_table(path: str):
    import pyarrow
    import pyarrow.parquet

    try:
        with _open_binary(path) as f:
            return pyarrow.parquet.read_table(f)
    except pyarrow.ArrowInvalid as e:
        raise DataError(f"{path}: not a Parquet file ({e}); data.format 'hf' reads a save_to_disk folder or a "
                        f".parquet file") from None


def _saved_dataset(path: str, split: str):
    """The ``datasets.Dataset`` saved at ``path``; of a ``DatasetDict``, its split for ``split``."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.format 'hf' reads save_to_disk folders with the datasets package: pip install "
                        "datasets") from None
    try:
        saved = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(saved, datasets.Dataset):
        return saved
    name = next((name for name in HF_SPLITS[split] if name in saved), None)
    if name is None:
        raise DataError(f"{path} holds the splits {sorted(saved)}, none named {' or '.join(HF_SPLITS[split])} for "
                        f"data.{split}_file: point data.{split}_file at the split's folder ({path}/SPLIT)")
    return saved[name]


def _open_binary(path: str) -> BinaryIO:
    return paths.as_path(path).open("rb")


def _lines_starting_in(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` of each line of ``f`` whose first byte lies in ``[start, end)``."""
    if start > 0:
        f.seek(start - 1)
        f.readline()  # the line that holds byte start - 1 belongs to the range before
    else:
        f.seek(0)
    offset = f.tell()
    while offset < end:
        line = f.readline()
        if not line:
            return
        yield offset, line
        offset += len(line)


def _jsonl_pairs(path: str, lines: Iterable[tuple[str, bytes]], config: DataConfig) -> list[tuple[str, str]]:
    """The pairs of the JSONL ``(line label, raw line)``s of file ``path`` (errors name ``path`` + the label,
    e.g. ``:12``); blank lines skipped."""
    pairs = []
    for label, raw in lines:
        where = path + label
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _not_utf8(path, where, error) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        pairs.append((_field(record, config.source_field, where), _field(record, config.target_field, where)))
        if config.max_examples and len(pairs) >= config.max_examples:
            break
    return pairs


def _read_table(f: BinaryIO, path: str, config: DataConfig) -> list[tuple[str, str]]:
    """The pairs of a TSV/CSV file with a header row (fields may span lines, as the csv module allows)."""
    pairs = []
    try:
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""),
                                delimiter="\t" if config.format == "tsv" else ",")
        for field in (config.source_field, config.target_field):
            if reader.fieldnames is None or field not in reader.fieldnames:
                raise DataError(f"{path}: no column {field!r} in the header {reader.fieldnames}")
        for row in reader:
            pairs.append((row[config.source_field] or "", row[config.target_field] or ""))
            if config.max_examples and len(pairs) >= config.max_examples:
                break
    except UnicodeDecodeError:  # raised for a whole decoded chunk: find the line again
        number, error = _first_undecodable_line(path)
        raise _not_utf8(path, f"{path}:{number}", error) from None
    return pairs


def _first_undecodable_line(path: str) -> tuple[int, UnicodeDecodeError]:
    """The 1-based number of the first line of ``path`` that is not UTF-8, and its decoding error."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, error
    raise AssertionError(f"{path}: a UTF-8 decoding error that no line reproduces")


def _not_utf8(path: str, where: str, error: UnicodeDecodeError) -> DataError:
    """The error for a line of ``path`` that is not UTF-8; ``where`` names the file and the line."""
    name = os.path.basename(path)
    return DataError(f"{where}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at column "
                     f"{error.start + 1} is {error.reason}); data files must be UTF-8: re-encode it, e.g. "
                     f"`iconv -f LATIN1 -t UTF-8 {name} > utf8-{name}` (with the file's actual encoding in place of "
                     f"LATIN1; `file {name}` may name it)")
