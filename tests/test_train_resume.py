"""Kill -9 at random moments (one of them in the middle of an orbax save), rerun the same command: the run
resumes from the last complete checkpoint and ends with exactly the params of an uninterrupted run, and
metrics.jsonl holds one row per step; with bucketed rows and with packed rows (``data.packing``: the grain
iterator's state is the checkpoint's data position). SIGTERM between checkpoints (a preemption notice): a
checkpoint of the next step, and the rerun ends as exactly."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import testing

STEPS = 10


def _command(config_path):
    return [sys.executable, "-m", "jaxencdec.cli", "train", str(config_path)]


# packed: rows of two to four of the tiny run's pairs
PACKED = {"packing": True, "max_source_length": 48, "max_target_length": 16}


def _write_config(folder, name, packing=False, steps=STEPS, every=2):
    config = testing.tiny_run_config(str(folder / "shared"), train={"num_steps": steps, "dropout": True},
                                     checkpoint={"every": every, "keep": 2, "async_save": True},
                                     data=PACKED if packing else {})
    config["output_dir"] = str(folder / name)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _run(config_path, env):
    proc = subprocess.run(_command(config_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _signal_when(config_path, env, condition, signum, deadline_s=240):
    """Starts the command, sends it ``signum`` as soon as ``condition()`` holds; returns (sent, the process
    finished: its ``returncode``, ``stdout`` and ``stderr``)."""
    proc = subprocess.Popen(_command(config_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    start = time.monotonic()
    sent = False
    while proc.poll() is None and time.monotonic() - start < deadline_s:
        if condition(time.monotonic() - start):
            os.kill(proc.pid, signum)
            sent = True
            break
        time.sleep(0.0005)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=120)
    assert sent or proc.returncode == 0, proc.stderr_text[-3000:]
    return sent, proc


def _kill_when(config_path, env, condition):
    """Starts the command, SIGKILLs it as soon as ``condition()`` holds; returns (killed, stdout)."""
    killed, proc = _signal_when(config_path, env, condition, signal.SIGKILL)
    return killed, proc.stdout_text


def _step_of(line: str) -> int:
    """The step of a metrics line; 0 for a line a kill cut short."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["bucketed", "packed"])
def test_kill_and_resume_is_exact(tmp_path, packing):
    env = testing.subprocess_env(None)
    reference = _write_config(tmp_path, "reference", packing)
    _run(reference, env)
    expected = testing.final_params(str(tmp_path / "reference"))

    victim = _write_config(tmp_path, "victim", packing)
    ckpt = tmp_path / "victim" / "checkpoints"

    # 1. kill in the middle of a checkpoint save: once a complete checkpoint exists, as soon as orbax's
    #    temporary folder for the next one shows up
    def saving(_):
        names = os.listdir(ckpt) if ckpt.is_dir() else []
        return any(n.isdigit() for n in names) and any("tmp" in n for n in names)

    killed, _ = _kill_when(victim, env, saving)
    assert killed, "the run finished before a save was caught in progress"
    leftovers = sorted(os.listdir(ckpt))
    half_written = [n for n in leftovers if "tmp" in n]
    complete = [int(n) for n in leftovers if n.isdigit()]
    assert half_written and complete, leftovers

    # 2. rerun, and kill it at a random moment of its training: after a random step, plus a random delay
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    after_step, delay = rnd.randint(max(complete) + 1, STEPS - 1), rnd.uniform(0.0, 0.05)
    metrics = tmp_path / "victim" / "metrics.jsonl"
    # The killed run's rows of steps after its checkpoint stay until this run starts: it rewrites the file
    # (a new inode) without them, and only then do its rows count.
    inode_before = metrics.stat().st_ino if metrics.exists() else None
    reached = {}

    def past_random_moment(elapsed):
        if "t" not in reached:
            rewritten = metrics.exists() and metrics.stat().st_ino != inode_before
            lines = metrics.read_text().splitlines() if rewritten else []
            if any(_step_of(line) >= after_step for line in lines):
                reached["t"] = elapsed
            return False
        return elapsed >= reached["t"] + delay

    killed, out = _kill_when(victim, env, past_random_moment)
    resumed = re.findall(r"resumed from checkpoint step (\d+)", out)
    # it restarted from the last complete checkpoint, never from the half-written one
    assert resumed and int(resumed[0]) == max(complete), (out, leftovers)

    # 3. finish
    proc = _run(victim, env)
    assert all("tmp" not in name for name in os.listdir(ckpt))  # leftovers were cleaned up
    got = testing.final_params(str(tmp_path / "victim"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(got[key], expected[key]), f"{key} differs (random kill seed {seed})"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == STEPS
    # three runs, two of them killed: still one row per step
    assert [_step_of(line) for line in metrics.read_text().splitlines()] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_rerun_after_completion_does_nothing_more(tmp_path):
    # a finished run restarted resumes at the last step and trains no further
    env = testing.subprocess_env(None)
    config = _write_config(tmp_path, "done")
    cfg = json.loads(config.read_text())
    cfg["train"]["num_steps"] = 2
    config.write_text(json.dumps(cfg))
    _run(config, env)
    first = testing.final_params(str(tmp_path / "done"))
    proc = _run(config, env)
    assert "resumed from checkpoint step 2" in proc.stdout
    second = testing.final_params(str(tmp_path / "done"))
    assert all(np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_sigterm_between_checkpoints_saves_the_next_step_and_the_rerun_is_exact(tmp_path):
    steps = 30  # one checkpoint, at the end: a SIGTERM after step 3 falls between checkpoints
    env = testing.subprocess_env(None)
    reference = _write_config(tmp_path, "reference", steps=steps, every=steps)
    _run(reference, env)
    expected = testing.final_params(str(tmp_path / "reference"))

    victim = _write_config(tmp_path, "victim", steps=steps, every=steps)
    metrics = tmp_path / "victim" / "metrics.jsonl"

    def past_step_3(_):
        return metrics.exists() and any(_step_of(line) >= 3 for line in metrics.read_text().splitlines())

    sent, proc = _signal_when(victim, env, past_step_3, signal.SIGTERM)
    assert sent, "the run finished before it could be sent SIGTERM"
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr_text[-3000:]
    saved = re.findall(r"jaxencdec: stopped by SIGTERM: checkpoint step (\d+) saved in (\S+); rerun the same "
                       r"command to resume", proc.stderr_text)
    assert len(saved) == 1, proc.stderr_text[-3000:]
    step, folder = int(saved[0][0]), saved[0][1]
    assert 3 <= step < steps and folder == str(tmp_path / "victim" / "checkpoints")
    assert sorted(int(n) for n in os.listdir(folder) if n.isdigit()) == [step]  # complete, nothing half-written
    assert [_step_of(line) for line in metrics.read_text().splitlines()] == list(range(1, step + 1))

    rerun = _run(victim, env)
    assert f"resumed from checkpoint step {step}" in rerun.stdout  # no step trained twice or lost
    got = testing.final_params(str(tmp_path / "victim"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key
    assert [_step_of(line) for line in metrics.read_text().splitlines()] == list(range(1, steps + 1))
