"""Streaming training data: each process reads only the lines that start in its byte range of a JSONL file (counted
through the reader), every line is read by exactly one process, and a resume at any step continues with the
batches of the uninterrupted run."""

import io
import json
import random

import numpy as np
import pytest

import testing
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train import data
from jaxencdec.train.batches import PairEncoder, PairLoader, ShardLoader
from jaxencdec.train.data import DataConfig, DataError, read_pairs, read_shard


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = Tokenizer.from_pretrained(testing.write_vocab(str(tmp_path_factory.mktemp("tok"))))
    return PairEncoder(tok, None, 16, 6, decoder_start_token_id=2, pad_token_id=0, end_token_id=3)


def _write(path, n, seed=0):
    """``n`` JSONL lines of very different lengths (and one blank line)."""
    rng = random.Random(seed)
    lines = [json.dumps({"src": " ".join(rng.choice(testing.WORDS) for _ in range(rng.randint(1, 60))),
                         "tgt": f"title {i}"}) for i in range(n)]
    lines.insert(n // 2, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DataConfig(train_file=str(path), source_field="src", target_field="tgt", streaming=True)


class _CountingFile(io.BufferedReader):
    """A file whose ``readline`` results are counted (the bytes a reader consumed, read-ahead aside)."""

    consumed: list[int]

    def readline(self, *args):
        line = super().readline(*args)
        self.consumed.append(len(line))
        return line


@pytest.mark.parametrize("processes", [1, 2, 3, 5])
def test_each_process_reads_only_its_share(tmp_path, monkeypatch, processes):
    config = _write(tmp_path / "train.jsonl", 40)
    raw = (tmp_path / "train.jsonl").read_bytes()
    longest = max(len(line) for line in raw.splitlines(keepends=True))
    consumed: dict[int, list[int]] = {}

    def counting_open(path):
        f = _CountingFile(open(path, "rb", buffering=0))
        f.consumed = consumed.setdefault(len(consumed), [])
        return f

    monkeypatch.setattr(data, "_open_binary", counting_open)
    shards = [read_shard(config, "train", p, processes) for p in range(processes)]
    # together they are the file, each line once, in file order
    assert [pair for shard in shards for pair in shard] == read_pairs(config, "train")
    share = len(raw) / processes
    for p in range(processes):
        read = sum(consumed[p])
        assert read <= share + 1 + longest, (p, read, share, longest)  # its range, the byte before, one line after
    assert sum(sum(consumed[p]) for p in range(processes)) <= len(raw) + processes * (longest + 1)


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resume_at_a_random_step_continues_the_same_batches(tmp_path, encoder, seed):
    config = _write(tmp_path / "train.jsonl", 37, seed)
    processes, batch = 2, 6
    shards = [read_shard(config, "train", p, processes) for p in range(processes)]

    def loaders():
        made = []
        gather = lambda _: np.stack([np.asarray([m.epoch, m.batch, len(m.pairs)]) for m in made])
        made += [ShardLoader(shards[p], encoder, batch, p, processes, seed=seed, state_gather=gather)
                 for p in range(processes)]
        return made

    total = 4 * (len(shards[0]) // 3)  # several epochs of each shard
    uninterrupted = [_batches(loader, total) for loader in loaders()]
    stop = random.Random(seed).randrange(1, total)
    first = loaders()
    for loader in first:
        _batches(loader, stop)
    state = json.loads(json.dumps(first[0].get_state()))  # as the checkpoint stores it
    assert len(state["processes"]) == processes
    resumed = loaders()
    for p, loader in enumerate(resumed):
        loader.set_state(state)
        rest = _batches(loader, total - stop)
        assert all(_equal(a, b) for a, b in zip(rest, uninterrupted[p][stop:])), (p, stop)
    # each process's rows come from its own shard, every example of a shard once per epoch
    epoch = [ex for b in uninterrupted[1][:len(shards[1]) // 3] for ex in b["example_index"].tolist()]
    assert sorted(epoch) == sorted(set(epoch)) and max(epoch) < len(shards[1])


def test_resume_refuses_another_process_count_or_loader(tmp_path, encoder):
    config = _write(tmp_path / "train.jsonl", 30)
    two = [ShardLoader(read_shard(config, "train", p, 2), encoder, 4, p, 2,
                       state_gather=lambda row: np.stack([row, row])) for p in range(2)]
    state = two[0].get_state()
    one = ShardLoader(read_shard(config, "train", 0, 1), encoder, 4)
    with pytest.raises(DataError, match="saved by 2 processes, this run has 1"):
        one.set_state(state)
    whole = PairLoader(read_pairs(config, "train"), encoder, 4)
    with pytest.raises(DataError, match="data.streaming to true"):
        whole.set_state(state)
    with pytest.raises(DataError, match="data.streaming to false"):
        one.set_state(whole.get_state())


def test_streaming_config_checks(tmp_path):
    with pytest.raises(DataError, match="data.streaming reads JSONL"):
        DataConfig(format="csv", train_file="x.csv", source_field="a", target_field="b", streaming=True)
    with pytest.raises(DataError, match="max_examples"):
        DataConfig(train_file="x.jsonl", source_field="a", target_field="b", streaming=True, max_examples=4)


def test_trainer_streams_and_resumes_exactly(tmp_path):
    from jaxencdec.train.config import RunConfig
    from jaxencdec.train.loop import Trainer

    raw = testing.tiny_run_config(str(tmp_path), data={"streaming": True}, train={"num_steps": 6, "dropout": True},
                                  checkpoint={"every": 2, "keep": 3})
    first = Trainer(RunConfig.from_dict(raw), log=lambda s: None)
    assert isinstance(first.loader, ShardLoader)
    first.run()
    want = testing.final_params(first.out_dir)
    raw["checkpoint"]["resume_step"] = 2
    again = Trainer(RunConfig.from_dict(raw), log=lambda s: None)
    assert again.resumed_from == 2 and again.loader.get_state()["processes"][0]["batch"] == 2
    again.run()
    got = testing.final_params(again.out_dir)
    assert all(np.array_equal(want[k], got[k]) for k in want)
