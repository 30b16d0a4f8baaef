"""``data.packing``: the grain pipeline's packed rows (whole examples, segment ids, per-example positions), the same
global batches on one process and on two, its position saved and restored (also on another process count), and
the Trainer on packed rows: more tokens per slot, the efficiency printed and logged, an exact resume."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import testing
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train.batches import PairEncoder
from jaxencdec.train.config import RunConfig
from jaxencdec.train.data import DataConfig, DataError, open_pairs
from jaxencdec.train.loop import Trainer
from jaxencdec.train.packing import token_efficiency
from jaxencdec.train.pipeline import training_batches

GLOBAL_BATCH = 4
LENGTHS = {"max_source_length": 48, "max_target_length": 16}  # rows of two to four of the tiny run's pairs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``(pairs, encoder)``: the tiny run's 24 training pairs and its tokenizer's encoder (rows of 48 + 16)."""
    folder = str(tmp_path_factory.mktemp("corpus"))
    config = testing.tiny_run_config(folder)
    pairs = open_pairs(DataConfig(**config["data"]), "train")
    tokenizer = Tokenizer.from_pretrained(config["model"]["tokenizer"])
    encoder = PairEncoder(tokenizer, None, *LENGTHS.values(), decoder_start_token_id=2, pad_token_id=0,
                          end_token_id=3)
    return pairs, encoder


def loader(corpus, index=0, count=1):
    pairs, encoder = corpus
    return training_batches(pairs, encoder, GLOBAL_BATCH, index, count, seed=7, packed=True)


def segments(batch, row):
    """``[(source ids, labels, decoder inputs)]`` of each example packed in ``row``, checking its positions."""
    out = []
    for segment in range(1, int(batch["encoder_segment_ids"][row].max()) + 1):
        src = batch["encoder_segment_ids"][row] == segment
        tgt = batch["decoder_segment_ids"][row] == segment
        assert np.array_equal(batch["encoder_positions"][row][src], np.arange(src.sum()))
        assert np.array_equal(batch["decoder_positions"][row][tgt], np.arange(tgt.sum()))
        out.append((batch["input_ids"][row][src].tolist(), batch["labels"][row][tgt].tolist(),
                    batch["decoder_input_ids"][row][tgt].tolist()))
    return out


def test_rows_hold_whole_examples_each_once_per_epoch(corpus):
    pairs, encoder = corpus
    expected = {}
    for i, (source, target) in enumerate(pairs):
        labels = encoder.target_ids([target])[0]
        expected[i] = (encoder.source_lengths([source])[0], labels, [2] + labels[:-1])
    seen, batches = [], 0
    packed = loader(corpus)
    while len(seen) < len(pairs):
        batch, batches = next(packed), batches + 1
        assert batch["input_ids"].shape == (GLOBAL_BATCH, 48) and batch["labels"].shape == (GLOBAL_BATCH, 16)
        pads = batch["encoder_segment_ids"] == 0
        assert np.array_equal(batch["attention_mask"], 1 - pads) and (batch["input_ids"][pads] == 0).all()
        assert (batch["labels"][batch["decoder_segment_ids"] == 0] == -100).all()
        for row in range(GLOBAL_BATCH):
            for example in segments(batch, row):
                seen.append(next(i for i, e in expected.items() if e == tuple(example)))
    # the first epoch's examples are all there before any repeats (the last batch may open the next epoch)
    assert sorted(seen[:len(pairs)]) == list(range(len(pairs)))
    assert batches < len(pairs) // GLOBAL_BATCH  # fewer batches than one example per row takes
    assert 0 < token_efficiency(batch) <= 1


def test_sources_and_targets_longer_than_a_row_are_cut_to_it(corpus):
    """Examples longer than the rows (each target tokenized untruncated while sources are truncated, by grain's
    threads on one shared tokenizer) are cut to max_source_length / max_target_length, as unpacked rows are."""
    pairs, encoder = corpus
    long = [(" ".join([source] * 12), " ".join([target] * 12)) for source, target in pairs]
    packed = training_batches(long, encoder, GLOBAL_BATCH, seed=7, packed=True)
    for _ in range(2 * len(long) // GLOBAL_BATCH):
        batch = next(packed)
        assert batch["input_ids"].shape == (GLOBAL_BATCH, 48) and batch["labels"].shape == (GLOBAL_BATCH, 16)
        assert (batch["encoder_segment_ids"].max(axis=1) == 1).all()  # one example per row: each fills it
        assert (batch["attention_mask"] == 1).all() and (batch["labels"] != -100).all()


def test_two_processes_see_the_global_batches_of_one(corpus):
    one, halves = loader(corpus), [loader(corpus, i, 2) for i in range(2)]
    for _ in range(6):  # past an epoch boundary: 24 examples, 2-5 per row
        whole = next(one)
        parts = [next(h) for h in halves]
        for key, value in whole.items():
            assert np.array_equal(np.concatenate([p[key] for p in parts]), value), key


def test_the_position_resumes_on_any_process_count(corpus):
    straight = loader(corpus)
    for _ in range(3):
        next(straight)
    expected = [next(straight) for _ in range(3)]

    first = loader(corpus, 1, 2)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
    resumed = loader(corpus)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_positions_of_packed_and_unpacked_batches_do_not_mix(corpus):
    pairs, encoder = corpus
    unpacked = training_batches(pairs, encoder, GLOBAL_BATCH)
    with pytest.raises(DataError, match="set data.packing to false"):
        loader(corpus).set_state(unpacked.get_state())
    with pytest.raises(DataError, match="set data.packing to true"):
        unpacked.set_state(loader(corpus).get_state())


def test_packing_with_buckets_is_a_config_error(tmp_path):
    data = testing.tiny_run_config(str(tmp_path))["data"]
    with pytest.raises(DataError, match="data.source_buckets"):
        DataConfig(**data, packing=True, source_buckets=[12, 24])


def _run(folder, name, packing, num_steps=4, log=None):
    config = testing.tiny_run_config(str(folder / "shared"), train={"num_steps": num_steps, "dropout": True},
                                     data={"packing": packing, **LENGTHS}, checkpoint={"every": 2, "keep": 3})
    config["output_dir"] = str(folder / name)
    trainer = Trainer(RunConfig.from_dict(config), log=log or (lambda line: None))
    return trainer.run(), str(folder / name)


def test_trainer_packs_logs_the_efficiency_and_resumes_exactly(tmp_path):
    lines = []
    result, packed_dir = _run(tmp_path, "packed", True, log=lines.append)
    assert result["step"] == 4
    printed = [l for l in lines if l.startswith("token efficiency: ")]
    assert len(printed) == 1 and "data.packing true" in printed[0], lines

    def efficiency(run_dir):
        rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
        return [r["train/token_efficiency"] for r in rows if "train/loss" in r]

    _, unpacked_dir = _run(tmp_path, "unpacked", False)
    packed, unpacked = efficiency(packed_dir), efficiency(unpacked_dir)
    assert len(packed) == 4 and min(packed) > max(unpacked), (packed, unpacked)

    # the step-4 checkpoint and the exports gone: the rerun resumes at step 2 from grain's saved position
    expected = testing.final_params(packed_dir)
    shutil.rmtree(os.path.join(packed_dir, "checkpoints", "4"))
    shutil.rmtree(os.path.join(packed_dir, "final_model"))
    result, _ = _run(tmp_path, "packed", True)
    assert result["resumed_from"] == 2 and result["step"] == 4
    got = testing.final_params(packed_dir)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
