"""tools/prepare_cnn_dailymail.py writes the files the CNN/DailyMail configs read, from a small local dataset with
CNN/DailyMail's columns (the hub's copy is not reachable in tests): a save_to_disk folder and Parquet files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "prepare_cnn_dailymail.py"


def _split(name: str, n: int):
    return datasets.Dataset.from_dict({
        "article": [f"{name} article {i}: the council voted ✓ to build a bridge." for i in range(n)],
        "highlights": [f"{name} highlight {i}" for i in range(n)],
        "id": [f"{name}-{i}" for i in range(n)],
    })


@pytest.fixture(scope="module")
def local_dataset():
    return datasets.DatasetDict({"train": _split("train", 5), "validation": _split("validation", 3),
                                 "test": _split("test", 2)})


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_from_a_save_to_disk_folder(local_dataset, tmp_path):
    local_dataset.save_to_disk(tmp_path / "saved")
    out = tmp_path / "data" / "cnn_dailymail"
    subprocess.run([sys.executable, str(TOOL), "--source", str(tmp_path / "saved"), "--out", str(out)], check=True)
    for split, n in (("train", 5), ("validation", 3), ("test", 2)):
        rows = _read(out / f"{split}.jsonl")
        assert rows == [{"article": a, "highlights": h} for a, h in
                        zip(local_dataset[split]["article"], local_dataset[split]["highlights"])]
        assert len(rows) == n
    assert not list(out.glob("*.partial"))
    # the configs' data section reads exactly these files and fields
    config = json.loads((ROOT / "configs" / "bert2bert_cnn_dailymail.json").read_text())["data"]
    assert config["train_file"].endswith("cnn_dailymail/train.jsonl")
    assert set(rows[0]) == {config["source_field"], config["target_field"]}


def test_from_parquet_files_with_a_limit(local_dataset, tmp_path):
    for split in ("train", "validation"):
        (tmp_path / "pq" / split).mkdir(parents=True)
        local_dataset[split].to_parquet(tmp_path / "pq" / split / "0000.parquet")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(TOOL), "--source", f"parquet:{tmp_path}/pq/*/*.parquet",
                           "--out", str(out), "--limit", "2"], check=True, capture_output=True, text=True)
    assert [r["highlights"] for r in _read(out / "train.jsonl")] == ["train highlight 0", "train highlight 1"]
    assert len(_read(out / "validation.jsonl")) == 2
    assert "test: not in" in done.stderr and not (out / "test.jsonl").exists()
