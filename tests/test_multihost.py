"""Two processes on 127.0.0.1 (jax.distributed, CPU collectives, 4 devices each) train 5 steps on a
data x fsdp x model = 2 x 2 x 2 mesh and end with the params of one process with 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import testing


def _config(tmp_path, name):
    config = testing.tiny_run_config(str(tmp_path / "shared"), train={"num_steps": 5, "dropout": True},
                                     mesh={"data": 2, "fsdp": 2, "model": 2},
                                     checkpoint={"every": 0, "keep": 1})
    config["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_two_processes_equal_one_process_with_8_devices(tmp_path):
    single = _config(tmp_path, "single")
    proc = subprocess.run([sys.executable, "-m", "jaxencdec.cli", "train", str(single)],
                          env=testing.subprocess_env(8), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = _config(tmp_path, "multi")
    workers = testing.start_train_workers(multi, 2, testing.subprocess_env(None, JAX_NUM_CPU_DEVICES="4"))
    outputs = testing.finish_workers(workers)
    # process 0 alone prints the result line; both took part in training and in the checkpoint save
    results = [[l for l in out.splitlines() if l.startswith("{")] for out, _ in outputs]
    assert json.loads(results[0][-1])["step"] == 5
    assert not results[1]  # (gloo's own connection lines aside)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["5"]

    want, got = testing.final_params(str(tmp_path / "single")), testing.final_params(str(tmp_path / "multi"))
    assert want.keys() == got.keys()
    diff = max(float(np.max(np.abs(want[k] - got[k]))) for k in want)
    assert diff <= 1e-5, diff
