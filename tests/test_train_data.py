"""Data: readers, tokenization to static shapes, a deterministic order independent of the process count."""

import json
import os

import numpy as np
import pytest

import testing
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train.batches import PairEncoder
from jaxencdec.train.data import DataConfig, DataError, aclsum_dir, open_pairs
from jaxencdec.train.pipeline import eval_batches, training_batches


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(testing.write_vocab(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture()
def encoder(tok):
    return PairEncoder(tok, None, 16, 6, decoder_start_token_id=2, pad_token_id=0, end_token_id=3)


def _pairs(n):
    return [(f"we propose method {' '.join(['model'] * (i % 7))}", f"title number {i}") for i in range(n)]


def test_labels_and_decoder_inputs(encoder, tok):
    out = encoder(["we propose a new method", "model"], ["short titles", "a b c d e f g h"])
    assert {k: v.shape for k, v in out.items()} == {
        "input_ids": (2, 16), "attention_mask": (2, 16), "decoder_input_ids": (2, 6),
        "decoder_attention_mask": (2, 6), "labels": (2, 6)}
    assert all(v.dtype == np.int32 for v in out.values())
    target = tok(["short titles"], padding=False)["input_ids"][0]  # [CLS] ... [SEP]
    assert target[0] == 2 and target[-1] == 3
    n = len(target) - 1  # the leading start token is dropped from the labels
    assert out["labels"][0, :n].tolist() == target[1:]
    assert (out["labels"][0, n:] == -100).all()
    assert out["decoder_input_ids"][0, 0] == 2 and out["decoder_input_ids"][0, 1:n].tolist() == target[1:-1]
    assert out["decoder_attention_mask"][0].tolist() == [1] * n + [0] * (6 - n)
    # a long target is cut but still ends with the end token
    assert out["labels"][1, -1] == 3 and (out["labels"][1] != -100).all()
    assert out["attention_mask"][1].sum() == 3 and out["input_ids"][1, 3:].tolist() == [0] * 13


def test_order_is_deterministic_and_process_count_independent(encoder):
    pairs = _pairs(20)
    one = training_batches(pairs, encoder, 4, seed=3)
    halves = [training_batches(pairs, encoder, 4, p, 2, seed=3) for p in range(2)]
    seen = []
    for _ in range(12):  # crosses epoch boundaries (5 batches per epoch)
        full = next(one)
        parts = [next(h) for h in halves]
        for key in full:
            np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in parts]))
        seen += full["example_index"].tolist()
    # each epoch visits every example once, each in another order
    epochs = [seen[e * 20:(e + 1) * 20] for e in range(2)]
    assert all(sorted(epoch) == list(range(20)) for epoch in epochs) and epochs[0] != epochs[1]
    other_seed = training_batches(pairs, encoder, 4, seed=4)
    assert [i for _ in range(5) for i in next(other_seed)["example_index"].tolist()] != epochs[0]
    single_rows = training_batches(pairs, encoder, 1, seed=3)  # a global batch of one row
    assert [int(next(single_rows)["example_index"][0]) for _ in range(20)] == epochs[0]
    in_order = training_batches(pairs, encoder, 4, shuffle=False)
    assert [i for _ in range(6) for i in next(in_order)["example_index"].tolist()] == list(range(20)) + [0, 1, 2, 3]


class Reads(list):
    """Pairs that record which indices were read."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.read = []

    def __getitem__(self, index):
        self.read.append(int(index))
        return super().__getitem__(index)


def test_a_process_reads_only_its_rows_of_each_global_batch(encoder):
    """Without buckets a process reads (and tokenizes) its rows alone; with them, the global batch's sources."""

    for buckets in (None, (8, 16)):
        per_process = [Reads(_pairs(24)) for _ in range(3)]
        loaders = [training_batches(per_process[p], encoder, 6, p, 3, seed=1, buckets=buckets) for p in range(3)]
        whole = training_batches(_pairs(24), encoder, 6, seed=1)
        for _ in range(5):
            rows = next(whole)["example_index"].tolist()
            for p, loader in enumerate(loaders):
                per_process[p].read.clear()
                assert next(loader)["example_index"].tolist() == rows[2 * p:2 * p + 2]
                if buckets is None:
                    assert sorted(per_process[p].read) == sorted(rows[2 * p:2 * p + 2])
                else:  # its rows' pairs, and the others' sources
                    assert sorted(set(per_process[p].read)) == sorted(set(rows))


def test_resume_from_state(encoder):
    pairs = _pairs(10)
    a = training_batches(pairs, encoder, 4, seed=0)
    for _ in range(3):
        next(a)
    b = training_batches(pairs, encoder, 4, seed=0)
    b.set_state(json.loads(json.dumps(a.get_state())))
    for _ in range(4):
        np.testing.assert_array_equal(next(a)["input_ids"], next(b)["input_ids"])
    with pytest.raises(DataError, match="examples"):
        training_batches(_pairs(11), encoder, 4).set_state(a.get_state())
    with pytest.raises(DataError, match="set data.workers to 0 again"):
        training_batches(pairs, encoder, 4, workers=1).set_state(a.get_state())
    with pytest.raises(DataError, match="earlier jaxencdec"):
        b.set_state({"epoch": 1, "batch": 2, "num_examples": 10})


def test_eval_batches_count_each_example_once(encoder):
    batches = list(eval_batches(_pairs(10), encoder, 4))
    assert len(batches) == 3
    idx = np.concatenate([b["example_index"] for b in batches])
    w = np.concatenate([b["weights"] for b in batches])
    assert sorted(idx[w > 0].tolist()) == list(range(10))
    assert (batches[-1]["labels"][2:] == -100).all()  # filler rows carry no loss
    reads = Reads(_pairs(10))
    next(eval_batches(reads, encoder, 4))
    assert sorted(reads.read) == [0, 1, 2, 3]  # nothing read ahead of the batch asked for
    halves = [list(eval_batches(_pairs(10), encoder, 4, p, 2)) for p in range(2)]
    for whole, *parts in zip(batches, *halves):
        assert all(np.array_equal(whole[k], np.concatenate([p[k] for p in parts])) for k in whole)


def test_more_processes_than_examples(encoder):
    pairs = _pairs(3)
    with pytest.raises(DataError, match=r"has 3 examples, fewer than one global batch of 4 \(train.batch_size\)"):
        training_batches(pairs, encoder, 4, 3, 4)
    assert next(training_batches(pairs, encoder, 4, 3, 4, packed=True))["input_ids"].shape == (1, 16)
    parts = [list(eval_batches(pairs, encoder, 4, p, 4)) for p in range(4)]  # each process: one row of one batch
    assert [[float(b["weights"][0]) for b in batches] for batches in parts] == [[1.0], [1.0], [1.0], [0.0]]


def test_buckets(encoder):
    pairs = [("model", "t")] * 4 + [(" ".join(["model"] * 12), "t")] * 4
    loader = training_batches(pairs, encoder, 4, shuffle=False, buckets=(4, 8, 16))
    assert next(loader)["input_ids"].shape == (4, 4)
    assert next(loader)["input_ids"].shape == (4, 16)
    # two processes agree on the length without asking each other: a long source on one pads both
    mixed = [("model", "t"), (" ".join(["model"] * 12), "t")] * 2
    halves = [training_batches(mixed, encoder, 2, p, 2, shuffle=False, buckets=(4, 8, 16)) for p in range(2)]
    assert [next(h)["input_ids"].shape for h in halves] == [(1, 16), (1, 16)]


def test_readers(tmp_path):
    (tmp_path / "a.tsv").write_text("src\ttgt\nhello there\thi\n")
    (tmp_path / "a.csv").write_text('src,tgt\n"hello, there",hi\n')
    (tmp_path / "a.jsonl").write_text(json.dumps({"x": {"s": ["one", "two"]}, "t": "hi"}) + "\n")
    read = lambda name: open_pairs(DataConfig(name, str(tmp_path / f"a.{name}"), None, "src", "tgt"), "train")
    assert read("tsv") == [("hello there", "hi")]
    assert read("csv") == [("hello, there", "hi")]
    assert open_pairs(DataConfig("jsonl", str(tmp_path / "a.jsonl"), None, "x.s", "t"), "train") == [("one two", "hi")]
    with pytest.raises(DataError, match="a.jsonl:1: no field 'x.q'"):
        open_pairs(DataConfig("jsonl", str(tmp_path / "a.jsonl"), None, "x.q", "t"), "train")
    with pytest.raises(DataError, match="no column"):
        open_pairs(DataConfig("csv", str(tmp_path / "a.csv"), None, "source", "tgt"), "train")
    with pytest.raises(DataError, match="does not exist"):
        DataConfig("jsonl", str(tmp_path / "missing.jsonl"), None, "a", "b").check(need_eval=False)


def test_aclsum_package():
    config = DataConfig(format="aclsum", target_field="summary.challenge")
    pairs = open_pairs(config, "train")
    assert len(pairs) == 100 and len(open_pairs(config, "eval")) == 50
    assert all(src and tgt for src, tgt in pairs)
    assert os.path.isfile(os.path.join(aclsum_dir(), "test.jsonl"))
    title = open_pairs(DataConfig(format="aclsum"), "train")[0]
    assert title[1] == "Exploring Correlation of Dependency Relation Paths for Answer Extraction"


def test_demo_training_data_keeps_test_papers_out(tmp_path):
    from jaxencdec import demo

    warmup_file, titles_file = demo.write_training_data(str(tmp_path), "[MASK]")
    def read(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    warmup, titles = read(warmup_file), read(titles_file)
    train_papers = demo.read_papers("train") + demo.read_papers("val")
    test_text = {p.abstract for p in demo.read_papers("test")} | {p.title for p in demo.read_papers("test")}
    # phase 2: every train/val title pair (target marked by the task token) TITLE_REPEATS times, then one distinct
    # copy pair per paper (unmarked)
    n_titles = demo.TITLE_REPEATS * len(train_papers)
    assert titles[:n_titles] == [{"source": p.abstract, "target": f"[MASK] {p.title}"}
                                 for p in train_papers] * demo.TITLE_REPEATS
    copies = titles[n_titles:]
    assert len(copies) == len(train_papers) and all(c in warmup for c in copies)
    assert not any("[MASK]" in row["target"] for row in warmup + copies)
    assert len({json.dumps(c) for c in copies}) == len(copies)
    # the warm-up copies the first sentence of its window; nothing comes from the test split
    assert all(row["source"].startswith(row["target"]) for row in warmup)
    assert not any(row["source"] in test_text or row["target"].removeprefix("[MASK] ") in test_text
                   for row in warmup + titles)


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv"])
def test_non_utf8_file_names_file_line_and_fix(tmp_path, fmt):
    sep = {"jsonl": None, "tsv": "\t", "csv": ","}[fmt]
    good = [json.dumps({"src": f"text {i}", "tgt": f"title {i}"}) if sep is None else f"text {i}{sep}title {i}"
            for i in range(3)]
    bad = (b'{"src": "caf\xe9", "tgt": "t"}' if sep is None else f"caf\xe9{sep}t".encode("latin-1"))
    header = [] if sep is None else [f"src{sep}tgt".encode()]
    lines = header + [line.encode() for line in good] + [bad] + [good[0].encode()] * 2000  # past one decoded chunk
    path = tmp_path / f"latin1.{fmt}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(format=fmt, train_file=str(path), source_field="src", target_field="tgt")
    with pytest.raises(DataError) as caught:
        open_pairs(cfg, "train")
    message = str(caught.value)
    assert f"{path}:{len(header) + 4}:" in message  # the bad line, 1-based
    assert "0xe9" in message and "UTF-8" in message and "iconv" in message
    # the same text re-encoded reads
    path.write_bytes(path.read_bytes().decode("latin-1").encode("utf-8"))
    assert open_pairs(cfg, "train")[3] == ("caf\xe9", "t")


def test_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"article": [f"text {i}" for i in range(5)],
            "summary": [{"short": f"title {i}", "long": ["a", f"b{i}"]} for i in range(5)], "id": list(range(5))}
    whole = datasets.Dataset.from_dict(rows)
    splits = datasets.DatasetDict({"train": whole, "validation": whole.select([3, 1])})
    splits.save_to_disk(str(tmp_path / "dict"))
    whole.shuffle(seed=0).save_to_disk(str(tmp_path / "one"))  # saved with an order of its own
    whole.to_parquet(str(tmp_path / "train.parquet"))
    expected = [(f"text {i}", f"title {i}") for i in range(5)]

    def pairs(path, split="train", **fields):
        fields = {"source_field": "article", "target_field": "summary.short", **fields}
        key = "train_file" if split == "train" else "eval_file"
        return list(open_pairs(DataConfig(format="hf", **{key: str(path)}, **fields), split))

    saved = open_pairs(DataConfig(format="hf", train_file=str(tmp_path / "dict"), source_field="article",
                                  target_field="summary.short"), "train")
    assert not isinstance(saved, list) and saved[4] == expected[4] and len(saved) == 5  # rows read when asked for
    assert pairs(tmp_path / "dict") == expected
    assert pairs(tmp_path / "dict", "eval") == [expected[3], expected[1]]
    assert pairs(tmp_path / "train.parquet") == expected
    shuffled = whole.shuffle(seed=0)
    assert pairs(tmp_path / "one") == [(r["article"], r["summary"]["short"]) for r in shuffled]
    assert pairs(tmp_path / "train.parquet", target_field="summary.long")[1] == ("text 1", "a b1")
    assert open_pairs(DataConfig(format="hf", train_file=str(tmp_path / "train.parquet"), source_field="article",
                                 target_field="summary.short", max_examples=2), "train") == expected[:2]
    with pytest.raises(DataError, match="no column 'body'; the columns are"):
        pairs(tmp_path / "dict", source_field="body")
    datasets.DatasetDict({"train": whole}).save_to_disk(str(tmp_path / "only_train"))
    with pytest.raises(DataError, match=r"splits \['train'\], none named validation or test"):
        pairs(tmp_path / "only_train", "eval")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a Parquet file"):
        pairs(tmp_path / "bad.parquet")


class _Counting:
    """A loader of batches 0, 1, 2, ... whose position is the next batch; batch ``fail_at`` raises."""

    def __init__(self, fail_at=None):
        self.next_batch, self.fail_at = 0, fail_at

    def __next__(self):
        if self.next_batch == self.fail_at:
            raise ValueError(f"batch {self.fail_at} is unreadable")
        self.next_batch += 1
        return self.next_batch - 1

    def get_state(self):
        return {"next": self.next_batch}

    def set_state(self, state):
        self.next_batch = state["next"]


def test_batches_read_ahead_count_in_the_position_only_once_returned():
    from jaxencdec.train.batches import Prefetched

    batches = Prefetched(_Counting(), prepare=lambda b: b * 10)
    assert next(batches) == (0, 0) and next(batches) == (1, 10)
    assert batches.get_state() == {"next": 2}  # batch 2 is being read ahead: it does not count
    batches.set_state({"next": 7})  # the batch read ahead is dropped
    assert next(batches) == (7, 70) and batches.get_state() == {"next": 8}
    batches.close()

    failing = Prefetched(_Counting(fail_at=1), prepare=lambda b: b)
    assert next(failing) == (0, 0)  # batch 1 fails while read ahead, and is raised where it is asked for
    with pytest.raises(ValueError, match="batch 1 is unreadable"):
        next(failing)
    failing.close()

