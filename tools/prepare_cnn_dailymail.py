"""Writes the JSONL files the CNN/DailyMail run configs read (``data/cnn_dailymail/{train,validation,test}.jsonl``,
one ``{"article": ..., "highlights": ...}`` object per line), with Hugging Face ``datasets``.

    pip install datasets
    python tools/prepare_cnn_dailymail.py                          # from the hub: cnn_dailymail, config 3.0.0
    python tools/prepare_cnn_dailymail.py --out gs://BUCKET/data/cnn_dailymail   # straight into a bucket (gcsfs)
    python tools/prepare_cnn_dailymail.py --source ./cnn_dm_saved   # a folder written by Dataset(Dict).save_to_disk
    python tools/prepare_cnn_dailymail.py --source 'parquet:./cnn_dm/*/*.parquet' --limit 1000

``--source`` is a hub dataset id (with ``--config``), a ``save_to_disk`` folder, or ``parquet:GLOB`` where the
split is the parquet file's parent folder name (``.../train/0000.parquet``) or, failing that, its file-name prefix
(``train-00000-of-00003.parquet``). Splits absent from the source are skipped with a message; the hub's 287,113
training articles take a few minutes. Each file is written whole to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import PurePosixPath

FIELDS = ("article", "highlights")
SPLITS = ("train", "validation", "test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="cnn_dailymail", help="hub id, save_to_disk folder, or parquet:GLOB")
    p.add_argument("--config", default="3.0.0", help="the hub dataset's configuration (default 3.0.0)")
    p.add_argument("--out", default="data/cnn_dailymail", help="output folder, local or any fsspec URL")
    p.add_argument("--splits", nargs="+", default=list(SPLITS))
    p.add_argument("--limit", type=int, help="at most this many examples per split")
    return p.parse_args(argv)


def load_splits(source: str, config: str):
    """A ``datasets.DatasetDict`` from a hub id, a ``save_to_disk`` folder or ``parquet:GLOB``."""
    import datasets

    if source.startswith("parquet:"):
        import glob

        files: dict[str, list[str]] = {}
        for path in sorted(glob.glob(source[len("parquet:"):])):
            parent = PurePosixPath(path).parent.name
            split = parent if parent in SPLITS else PurePosixPath(path).name.split("-")[0].split(".")[0]
            files.setdefault(split, []).append(path)
        if not files:
            raise SystemExit(f"--source {source}: no parquet file matches")
        return datasets.load_dataset("parquet", data_files=files)
    if os.path.isdir(source):
        loaded = datasets.load_from_disk(source)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    return datasets.load_dataset(source, config)


def write_split(dataset, path: str, limit: int | None) -> int:
    """Writes ``dataset``'s article/highlights as JSONL to ``path`` (any fsspec URL); returns the row count."""
    import fsspec

    missing = [f for f in FIELDS if f not in dataset.column_names]
    if missing:
        raise SystemExit(f"the dataset has no column(s) {missing}; it has {dataset.column_names}")
    rows = dataset.select_columns(list(FIELDS))
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    fs, target = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    temporary = target + ".partial"
    with fs.open(temporary, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False) + "\n")
    fs.mv(temporary, target)
    return len(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    splits = load_splits(args.source, args.config)
    for split in args.splits:
        if split not in splits:
            print(f"{split}: not in {args.source} (it has {sorted(splits)}), skipped", file=sys.stderr)
            continue
        path = f"{args.out.rstrip('/')}/{split}.jsonl"
        print(f"{split}: {write_split(splits[split], path, args.limit)} examples -> {path}")


if __name__ == "__main__":
    main()
