"""ArrayRecord data (``tools/to_array_record.py``): read record by record, each process only its rows of each global
batch (counted through the reader); a position saved on two processes resumes on one with the batches of an
uninterrupted run; grain worker processes make the same batches; bad records name the file and the record."""

import json
import random
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

import testing
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train.batches import PairEncoder
from jaxencdec.train.config import RunConfig, RunConfigError
from jaxencdec.train.data import DataConfig, DataError, open_pairs
from jaxencdec.train.pipeline import training_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import to_array_record  # noqa: E402


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = Tokenizer.from_pretrained(testing.write_vocab(str(tmp_path_factory.mktemp("tok"))))
    return PairEncoder(tok, None, 16, 6, decoder_start_token_id=2, pad_token_id=0, end_token_id=3)


def _jsonl(path, n, seed=0):
    """``n`` JSONL lines of very different lengths (and one blank line)."""
    rng = random.Random(seed)
    lines = [json.dumps({"src": " ".join(rng.choice(testing.WORDS) for _ in range(rng.randint(1, 60))),
                         "tgt": f"title {i}"}) for i in range(n)]
    lines.insert(n // 2, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _config(path, **kw):
    return DataConfig(format="arrayrecord", train_file=str(path), source_field="src", target_field="tgt", **kw)


def test_records_are_the_jsonl_lines_in_one_file_or_in_shards(tmp_path):
    jsonl = _jsonl(tmp_path / "train.jsonl", 23)
    want = list(open_pairs(DataConfig(train_file=jsonl, source_field="src", target_field="tgt"), "train"))
    [one] = to_array_record.convert(jsonl, str(tmp_path / "train.array_record"))
    pairs = open_pairs(_config(one), "train")
    assert not isinstance(pairs, list) and len(pairs) == 23 and list(pairs) == want
    shards = to_array_record.convert(jsonl, str(tmp_path / "shards" / "train.array_record"), shards=3)
    assert [p.rsplit("/", 1)[1] for p in shards] == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    sharded = open_pairs(_config(tmp_path / "shards" / "train-*.array_record"), "train")
    assert sorted(sharded) == sorted(want)  # round-robin into the shards, read shard after shard
    assert list(open_pairs(_config(one, max_examples=5), "train")) == want[:5]


def test_each_process_reads_only_its_records(tmp_path, encoder, monkeypatch):
    [path] = to_array_record.convert(_jsonl(tmp_path / "train.jsonl", 40), str(tmp_path / "train.array_record"))
    reads: list[int] = []
    get = grain.sources.ArrayRecordDataSource.__getitem__
    monkeypatch.setattr(grain.sources.ArrayRecordDataSource, "__getitem__",
                        lambda self, i: reads.append(int(i)) or get(self, i))
    whole = training_batches(open_pairs(_config(path), "train"), encoder, 8, seed=5)
    global_rows = [next(whole)["example_index"].tolist() for _ in range(7)]  # past an epoch (5 batches)
    for p in range(4):
        loader = training_batches(open_pairs(_config(path), "train"), encoder, 8, p, 4, seed=5)
        for rows in global_rows:
            reads.clear()
            assert next(loader)["example_index"].tolist() == rows[2 * p:2 * p + 2]
            assert sorted(reads) == sorted(rows[2 * p:2 * p + 2])


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_position_saved_on_two_processes_resumes_on_one(tmp_path, encoder, seed):
    [path] = to_array_record.convert(_jsonl(tmp_path / "train.jsonl", 37, seed), str(tmp_path / "t.array_record"))
    pairs = open_pairs(_config(path), "train")
    uninterrupted = training_batches(pairs, encoder, 6, seed=seed, buckets=(8, 16))
    want = [next(uninterrupted) for _ in range(20)]  # three epochs and more
    stop = random.Random(seed).randrange(1, 15)
    two = [training_batches(pairs, encoder, 6, p, 2, seed=seed, buckets=(8, 16)) for p in range(2)]
    for _ in range(stop):
        parts = [next(loader) for loader in two]
    state = json.loads(json.dumps(two[0].get_state()))  # as the checkpoint stores it
    assert state == two[1].get_state()  # the same position on every process
    assert _equal(want[stop - 1], {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    one = training_batches(pairs, encoder, 6, seed=seed, buckets=(8, 16))
    one.set_state(state)
    assert all(_equal(next(one), batch) for batch in want[stop:])


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_worker_processes_make_the_same_batches_and_resume(tmp_path, encoder, packed):
    [path] = to_array_record.convert(_jsonl(tmp_path / "train.jsonl", 30), str(tmp_path / "t.array_record"))
    pairs = open_pairs(_config(path), "train")
    plain = training_batches(pairs, encoder, 4, seed=2, packed=packed)
    want = [next(plain) for _ in range(12)]
    workers = training_batches(pairs, encoder, 4, seed=2, packed=packed, workers=2)
    try:
        assert all(_equal(next(workers), batch) for batch in want[:5])
        state = json.loads(json.dumps(workers.get_state()))
        again = training_batches(pairs, encoder, 4, seed=2, packed=packed, workers=2)
        try:
            again.set_state(state)
            assert all(_equal(next(again), batch) for batch in want[5:])
        finally:
            again.close()
    finally:
        workers.close()


def test_bad_records_name_the_file_and_the_record(tmp_path, encoder):
    from array_record.python import array_record_module

    path = str(tmp_path / "bad.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for record in [b'{"src": "a", "tgt": "b"}', b'{"src": "a"}', b"not json", b'{"src": "caf\xe9", "tgt": "t"}']:
        writer.write(record)
    writer.close()
    pairs = open_pairs(_config(path), "train")
    assert pairs[0] == ("a", "b")
    with pytest.raises(DataError, match=r"bad.array_record record 1: no field 'tgt'"):
        pairs[1]
    with pytest.raises(DataError, match=r"bad.array_record record 2: not a JSON object"):
        pairs[2]
    with pytest.raises(DataError, match=r"bad.array_record record 3: not UTF-8 text .*iconv"):
        pairs[3]
    with pytest.raises(DataError, match=r"record 1: no field 'tgt'"):  # raised where the batch is read
        next(training_batches(pairs, encoder, 2, shuffle=False))
    with pytest.raises(DataError, match="no file matches"):
        _config(tmp_path / "train-*.array_record").check(need_eval=False)
    with pytest.raises(DataError, match="mount the bucket"):
        open_pairs(_config("gs://bucket/train.array_record"), "train")
    with pytest.raises(ValueError, match=r"x.jsonl:2: not a JSON object"):
        (tmp_path / "x.jsonl").write_text('{"a": 1}\n[1, 2]\n')
        to_array_record.convert(str(tmp_path / "x.jsonl"), str(tmp_path / "x.array_record"))


def test_data_streaming_of_earlier_configs_says_what_replaced_it(tmp_path):
    raw = testing.tiny_run_config(str(tmp_path), data={"streaming": True})
    with pytest.raises(RunConfigError, match="data.streaming: every process now reads and tokenizes only its rows"):
        RunConfig.from_dict(raw)
    with pytest.raises(RunConfigError, match="data.workers must be >= 0"):
        RunConfig.from_dict(testing.tiny_run_config(str(tmp_path), data={"workers": -1}))


def test_trainer_reads_array_records_and_resumes_exactly(tmp_path):
    from jaxencdec.train.loop import Trainer

    raw = testing.tiny_run_config(str(tmp_path), train={"num_steps": 6, "dropout": True},
                                  checkpoint={"every": 2, "keep": 3})
    [records] = to_array_record.convert(raw["data"]["train_file"], str(tmp_path / "train.array_record"))
    raw["data"].update(format="arrayrecord", train_file=records, source_buckets=[12, 24])
    raw["data"]["eval_file"] = to_array_record.convert(raw["data"]["eval_file"], str(tmp_path / "val.array_record"))[0]
    first = Trainer(RunConfig.from_dict(raw), log=lambda s: None)
    first.run()
    assert first.evaluate(generate=False)["eval/tokens"] > 0
    want = testing.final_params(first.out_dir)
    raw["checkpoint"]["resume_step"] = 2
    again = Trainer(RunConfig.from_dict(raw), log=lambda s: None)
    assert again.resumed_from == 2
    again.run()
    got = testing.final_params(again.out_dir)
    assert all(np.array_equal(want[k], got[k]) for k in want)
