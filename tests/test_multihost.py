"""Two processes on 127.0.0.1 (jax.distributed, CPU collectives, 4 devices each) train 5 steps (past an epoch: 24
examples in batches of 8) on a data x fsdp x model = 2 x 2 x 2 mesh and end with the params of one process with 8
devices; checkpointed on two processes, the run resumes on one and ends there too; on padded rows from ArrayRecord
files with source buckets and on packed rows. A checkpoint on a bucket that one process cannot read is skipped by
both."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures)

import testing


def _config(tmp_path, name, **sections):
    config = testing.tiny_run_config(str(tmp_path / "shared"), mesh={"data": 2, "fsdp": 2, "model": 2},
                                     **{"train": {"num_steps": 5, "dropout": True},
                                        "checkpoint": {"every": 0, "keep": 1}, **sections})
    config["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _array_records(tmp_path) -> dict:
    """The tiny run's JSONL files as ArrayRecord files: the data section that reads them, with source buckets."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import to_array_record

    data = testing.tiny_run_config(str(tmp_path / "shared"))["data"]
    return {"format": "arrayrecord", "source_buckets": [12, 24], **{
        key: to_array_record.convert(data[key], str(tmp_path / "shared" / f"{key}.array_record"))[0]
        for key in ("train_file", "eval_file")}}


# Run by each of two jax.distributed processes (argv: coordinator port, process id, data section JSON, tokenizer):
# prints the example ids of the first 5 global batches as the Trainer assembles them (global arrays from each
# process's rows).
GLOBAL_IDS = """
import json, sys
import jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
from jax.experimental import multihost_utils
from jaxencdec.parallel.mesh import make_mesh
from jaxencdec.parallel.shard import global_batch
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train.batches import PairEncoder
from jaxencdec.train.data import DataConfig, open_pairs
from jaxencdec.train.pipeline import training_batches

data = DataConfig(**json.loads(sys.argv[3]))
encoder = PairEncoder(Tokenizer.from_pretrained(sys.argv[4]), None, data.max_source_length, data.max_target_length,
                      decoder_start_token_id=2, pad_token_id=0, end_token_id=3)
batches = training_batches(open_pairs(data, "train"), encoder, 8, jax.process_index(), jax.process_count(),
                           seed=data.seed, buckets=data.source_buckets)
mesh = make_mesh()
ids = [multihost_utils.process_allgather(global_batch({"i": next(batches)["example_index"]}, mesh)["i"],
                                         tiled=True).tolist() for _ in range(5)]
print(json.dumps(ids))
"""


@pytest.mark.slow
def test_two_processes_read_the_global_batches_of_one(tmp_path):
    """Example ids compared: 5 global batches of 8 (past an epoch of 24) made by two jax.distributed processes, 4
    rows each, are those one process makes alone."""
    from jaxencdec.tokenizer import Tokenizer
    from jaxencdec.train.batches import PairEncoder
    from jaxencdec.train.data import DataConfig, open_pairs
    from jaxencdec.train.pipeline import training_batches

    config = testing.tiny_run_config(str(tmp_path / "shared"))
    data = {**config["data"], **_array_records(tmp_path)}
    encoder = PairEncoder(Tokenizer.from_pretrained(config["model"]["tokenizer"]), None, 24, 8,
                          decoder_start_token_id=2, pad_token_id=0, end_token_id=3)
    alone = training_batches(open_pairs(DataConfig(**data), "train"), encoder, 8, buckets=(12, 24))
    want = [next(alone)["example_index"].tolist() for _ in range(5)]
    assert sorted(sum(want[:3], [])) == list(range(24))  # the first epoch, then the next one's

    port = testing.free_port()
    env = testing.subprocess_env(None, JAX_NUM_CPU_DEVICES="2")
    workers = [subprocess.Popen([sys.executable, "-c", GLOBAL_IDS, str(port), str(i), json.dumps(data),
                                 config["model"]["tokenizer"]], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = testing.finish_workers(workers, timeout=120)
    for out, _ in outputs:
        assert json.loads(out.strip().splitlines()[-1]) == want


def _assert_same_params(run_a, run_b):
    want, got = testing.final_params(run_a), testing.final_params(run_b)
    assert want.keys() == got.keys()
    diff = max(float(np.max(np.abs(want[k] - got[k]))) for k in want)
    assert diff <= 1e-5, diff


@pytest.mark.slow
@pytest.mark.parametrize("rows", ["padded", "packed"])
def test_a_run_checkpointed_on_two_processes_resumes_on_one(tmp_path, rows):
    """The global batches and the checkpoint's position (grain's) are the same for any process count. Two
    processes train 5 steps (checkpoints at 3 and 5); with step 5 removed, one process with 8 devices resumes at 3:
    it ends with the params of the two-process run and of one uninterrupted one-process run, which it could not if
    any of the three had seen other batches. Padded rows come from ArrayRecord files, with source buckets."""
    data = _array_records(tmp_path) if rows == "padded" else {"packing": True, "max_source_length": 48,
                                                               "max_target_length": 16}
    sections = dict(data=data, checkpoint={"every": 3, "keep": 2})
    single = _config(tmp_path, "single", **sections)
    proc = subprocess.run([sys.executable, "-m", "jaxencdec.cli", "train", str(single)],
                          env=testing.subprocess_env(8), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = _config(tmp_path, "multi", **sections)
    env = testing.subprocess_env(None, JAX_NUM_CPU_DEVICES="4")
    outputs = testing.finish_workers(testing.start_train_workers(multi, 2, env))
    # process 0 alone prints the result line; both took part in training and in the checkpoint saves
    results = [[l for l in out.splitlines() if l.startswith("{")] for out, _ in outputs]
    assert json.loads(results[0][-1])["step"] == 5
    assert not results[1]  # (gloo's own connection lines aside)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["3", "5"]
    _assert_same_params(str(tmp_path / "single"), str(tmp_path / "multi"))

    shutil.rmtree(tmp_path / "multi" / "checkpoints" / "5")
    shutil.rmtree(tmp_path / "multi" / "final_model")
    proc = subprocess.run([sys.executable, "-m", "jaxencdec.cli", "train", str(multi)],
                          env=testing.subprocess_env(8), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint step 3" in proc.stdout and json.loads(proc.stdout.splitlines()[-1])["step"] == 5
    _assert_same_params(str(tmp_path / "single"), str(tmp_path / "multi"))


# Imported at start-up by the one process whose PYTHONPATH holds it: its reads of checkpoint step 4 fail as a
# truncated array file does, while the other process reads that checkpoint fine.
ONE_HOST_SEES_DAMAGE = '''
from jaxencdec.train import checkpoints

_read = checkpoints.RunCheckpoints._read


def _damaged_step_4(self, step, target, scanned):
    if step == 4:
        raise ValueError("DATA_LOSS: Error reading local file: unexpected end of file")
    return _read(self, step, target, scanned)


checkpoints.RunCheckpoints._read = _damaged_step_4
'''


def _bucket_params(run_url):
    from flax import traverse_util

    from jaxencdec import paths
    from jaxencdec.checkpoint.formats import read_msgpack

    return traverse_util.flatten_dict(read_msgpack(paths.as_path(f"{run_url}/final_model/flax_model.msgpack")),
                                      sep="/")


@pytest.mark.slow
def test_a_checkpoint_one_process_cannot_read_is_skipped_by_every_process(tmp_path, gcs_emulator,  # noqa: F811
                                                                          gcs_bucket):
    """A run on a bucket whose checkpoint 4 is damaged for process 1 alone: both restore step 2 (one decision for
    all), process 0 moves step 4 aside, and together they end where the uninterrupted run ended."""
    config = _config(tmp_path, "run", train={"num_steps": 4, "dropout": True}, checkpoint={"every": 2, "keep": 2})
    run = f"{gcs_bucket}/two-process-damage"
    config.write_text(json.dumps({**json.loads(config.read_text()), "output_dir": run}))
    env = testing.subprocess_env(None, JAX_NUM_CPU_DEVICES="4")
    testing.finish_workers(testing.start_train_workers(config, 2, env))
    uninterrupted = _bucket_params(run)

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ONE_HOST_SEES_DAMAGE)
    envs = [env, {**env, "PYTHONPATH": os.pathsep.join([str(hook), env["PYTHONPATH"]])}]
    port = testing.free_port()
    workers = [subprocess.Popen([sys.executable, "-m", "jaxencdec.cli", "train", str(config), "--coordinator",
                                 f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], env=envs[i],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    (out, err), _ = testing.finish_workers(workers)
    assert "checkpoint step 4 in" in err and "cannot be restored (another process could not read it)" \
        in err, err[-3000:]
    assert "resumed from checkpoint step 2" in out, out[-3000:]
    steps = {name.split("/")[2] for name in gcs_emulator.object_names(gcs_bucket, "two-process-damage/checkpoints/")}
    assert steps == {"2", "4", "4.corrupt-1"}
    got = _bucket_params(run)
    assert all(np.array_equal(got[k], uninterrupted[k]) for k in uninterrupted)
