"""Writes a JSONL file's objects as ArrayRecord files (``data.format: "arrayrecord"``): one record per non-blank
line, the line's UTF-8 bytes unchanged, so ``data.source_field`` / ``target_field`` stay what they were.

    python tools/to_array_record.py data/cnn_dailymail/train.jsonl data/cnn_dailymail/train.array_record
    python tools/to_array_record.py train.jsonl data/train.array_record --shards 16   # train-00000-of-00016...

With ``--shards N`` the records go round-robin into N files named ``STEM-0000i-of-0000N.SUFFIX``; a run reads them
all with ``data.train_file`` set to ``STEM-*.SUFFIX``. Records are written one per group (``group_size:1``), so
reading one reads only its own bytes. The input may be a bucket URL; the output is a local (or mounted) path.
"""

from __future__ import annotations

import argparse
import json
import os

from jaxencdec import paths

WRITER_OPTIONS = "group_size:1"


def shard_paths(out: str, shards: int) -> list[str]:
    """``out`` itself for one shard, else ``STEM-0000i-of-0000N.SUFFIX`` for each of ``shards``."""
    if shards == 1:
        return [out]
    stem, suffix = os.path.splitext(out)
    return [f"{stem}-{i:05d}-of-{shards:05d}{suffix}" for i in range(shards)]


def convert(jsonl: str, out: str, shards: int = 1) -> list[str]:
    """Writes ``jsonl``'s objects to ``shard_paths(out, shards)``; returns those paths. Each temporary file is
    renamed into place once complete (removed on an error). Raises ValueError naming the line of a line that is
    not a JSON object."""
    from array_record.python import array_record_module

    targets = shard_paths(out, shards)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    writers = [array_record_module.ArrayRecordWriter(f"{path}.tmp", WRITER_OPTIONS) for path in targets]
    count = 0
    try:
        with paths.as_path(jsonl).open("rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    if not isinstance(json.loads(line), dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    raise ValueError(f"{jsonl}:{number}: not a JSON object ({e})") from None
                writers[count % shards].write(line.rstrip(b"\r\n"))
                count += 1
    except BaseException:
        for writer, path in zip(writers, targets):
            writer.close()
            os.remove(f"{path}.tmp")
        raise
    for writer in writers:
        writer.close()
    for path in targets:
        os.replace(f"{path}.tmp", path)
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", help="the JSONL file (local path or bucket URL)")
    parser.add_argument("out", help="the ArrayRecord file to write (with --shards, the name the shards derive from)")
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    for path in convert(args.jsonl, args.out, args.shards):
        print(path)


if __name__ == "__main__":
    main()
