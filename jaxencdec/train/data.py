"""Where the source/target pairs come from: ``DataConfig`` and ``open_pairs``, a split as a random-access sequence
of ``(source, target)`` texts (what a grain ``MapDataset`` reads, :mod:`jaxencdec.train.pipeline`).

ArrayRecord files and Hugging Face ``save_to_disk`` folders are read record by record, when a batch asks for them;
JSONL / TSV / CSV files, Parquet files and the ``aclsum`` package are parsed whole when opened. Paths are local or
bucket URLs (ArrayRecord: local or mounted, e.g. Cloud Storage through gcsfuse).
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Sequence

from jaxencdec import paths

FORMATS = ("jsonl", "tsv", "csv", "aclsum", "hf", "arrayrecord")
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
      the training data and ``validation`` (else ``test``) the eval data; or a ``.parquet`` file) |
      ``arrayrecord`` (ArrayRecord files, one UTF-8 JSON object per record, fields as in JSONL: a file, or a
      glob such as ``train-*.array_record`` for the shards of one split; ``tools/to_array_record.py`` writes them).
    source_field, target_field: JSON keys (dotted for nested objects, e.g. ``summary.challenge``; a list of
      strings, as ``sentences.abstract``, is joined with spaces), TSV/CSV header names or dataset column names
      (dotted for struct columns).
    max_source_length, max_target_length: token budgets (special tokens included; longer texts are cut).
    source_buckets: optional ascending source lengths; a batch is padded to the smallest bucket that holds
      its longest source (one compile per bucket) instead of to ``max_source_length``.
    seed, shuffle: the epoch permutation.
    max_examples: keep only the first N examples of each file (smoke runs).
    packing: training rows hold several examples each (``max_source_length`` source and ``max_target_length``
      target tokens per row, first-fit, with segment ids and per-example positions; see
      :mod:`jaxencdec.train.packing`) instead of one example padded; eval batches stay unpacked.
    workers: grain worker processes that read and tokenize the training batches (0: a thread of the training
      process); the batches are the same for any number.
    """

    # keys of earlier versions, and what replaced them (a config that still has one gets this message)
    RETIRED_KEYS = {"streaming": "every process now reads and tokenizes only its rows of each global batch, and the "
                                 "global batches are the same for any number of processes; data.format "
                                 "'arrayrecord' also reads only those records from the file: remove data.streaming"}

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
    packing: bool = False
    workers: int = 0

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
        if self.workers < 0:
            raise DataError(f"data.workers must be >= 0 (0: no worker processes), got {self.workers}")
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
            if self.format == "arrayrecord":
                _array_record_files(path, split)
            elif not (paths.exists(path) if self.format == "hf" else paths.is_file(path)):
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


def _pair(record: Any, config: DataConfig, where: str) -> tuple[str, str]:
    """``(source, target)``: ``record``'s ``data.source_field`` and ``data.target_field`` (errors name ``where``)."""
    return _field(record, config.source_field, where), _field(record, config.target_field, where)


def open_pairs(config: DataConfig, split: str) -> Sequence[tuple[str, str]]:
    """The ``(source, target)`` texts of a split's file (a local path or a bucket URL such as
    ``gs://b/train.jsonl``) as a random-access sequence: a list for the formats parsed whole, a reader of one
    record per item for ArrayRecord files and ``save_to_disk`` folders.

    Raises:
        DataError: the file is missing, is not UTF-8 text, holds invalid JSON or lacks a field or column; the
            message names the file and the line (or record). A record read on demand fails when it is read.
    """
    path = config.file(split)
    if config.format == "hf":
        return _hf_pairs(path, split, config)
    if config.format == "arrayrecord":
        return ArrayRecordPairs(_array_record_files(path, split), config)
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


class ArrayRecordPairs(Sequence):
    """The pairs of ArrayRecord files (grain's ``ArrayRecordDataSource``), each record a UTF-8 JSON object read
    and parsed when it is asked for; errors name the file and the record. Picklable (grain worker processes)."""

    def __init__(self, files: list[str], config: DataConfig):
        import grain

        self.files, self.config = files, config
        self._source = grain.sources.ArrayRecordDataSource(files)
        self._length = min(len(self._source), config.max_examples or len(self._source))
        if not self._length:
            raise DataError(f"{', '.join(files)} hold no records")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[str, str]:
        if not 0 <= index < self._length:
            raise IndexError(index)
        raw, where = self._source[index], f"{self._where(index)}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise _not_utf8(self.files[0], where, error) from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON object ({e}); each record holds one, as a JSONL line does") from None
        return _pair(record, self.config, where)

    def _where(self, index: int) -> str:
        """``file record r`` of the global record ``index``."""
        for path in self.files:
            count = _records_in(path)
            if index < count:
                return f"{path} record {index}"
            index -= count
        return f"record {index}"


def _records_in(path: str) -> int:
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def _array_record_files(path: str | None, split: str) -> list[str]:
    """The files of ``data.{split}_file``: one path, or a glob's matches in name order."""
    if path is None:
        raise DataError(f"data.{split}_file is not set")
    if "://" in path:
        raise DataError(f"data.{split}_file {path}: ArrayRecord files are read through the file system; mount the "
                        f"bucket (gcsfuse) and give the mounted path")
    files = sorted(glob.glob(path)) if glob.has_magic(path) else [path] if os.path.isfile(path) else []
    if not files:
        raise DataError(f"data.{split}_file {path} does not exist" + (" (no file matches)" if glob.has_magic(path)
                                                                       else ""))
    return files


def _hf_pairs(path: str | None, split: str, config: DataConfig) -> Sequence[tuple[str, str]]:
    """The pairs of a ``save_to_disk`` folder (read row by row from its memory-mapped Arrow files) or of a Parquet
    file (its two columns read whole) (``data.format: "hf"``); fields are column names, dotted for struct columns."""
    if path is None or not paths.exists(path):
        raise DataError(f"data.{split}_file {path} does not exist")
    columns = sorted({config.source_field.split(".")[0], config.target_field.split(".")[0]})
    parquet = paths.is_file(path)
    table = _parquet_table(path) if parquet else _saved_dataset(path, split)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; the columns are {table.column_names}")
    if parquet:
        rows = table.select(columns).slice(0, config.max_examples or None).to_pylist()
        pairs = [_pair(row, config, f"{path} row {i}") for i, row in enumerate(rows)]
    else:
        if config.max_examples:
            table = table.select(range(min(config.max_examples, len(table))))
        pairs = SavedDatasetPairs(table.select_columns(columns), path, config)
    if not len(pairs):
        raise DataError(f"{path} holds no examples")
    return pairs


class SavedDatasetPairs(Sequence):
    """The pairs of a ``datasets.Dataset`` (memory-mapped), each row read when it is asked for."""

    def __init__(self, dataset, path: str, config: DataConfig):
        self.dataset, self.path, self.config = dataset, path, config

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, str]:
        if not 0 <= index < len(self.dataset):
            raise IndexError(index)
        return _pair(self.dataset[int(index)], self.config, f"{self.path} row {index}")


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
        pairs.append(_pair(record, config, where))
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
