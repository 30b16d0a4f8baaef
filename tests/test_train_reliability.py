"""What a resume guarantees when things went wrong: a damaged newest checkpoint is skipped (and moved aside) and
the run still ends bitwise equal to an uninterrupted one; an older checkpoint can be chosen; a diverged run
says which kept checkpoint still holds sound params; metrics.jsonl keeps one row per step; a changed
learning-rate schedule is refused unless allowed; a stop signal waits for the step boundary."""

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

import testing
from jaxencdec.errors import CheckpointError
from jaxencdec.train.checkpoints import schedule_changes
from jaxencdec.train.config import RunConfig, RunConfigError
from jaxencdec.train.loop import Trainer, TrainingDivergedError
from jaxencdec.train.preemption import Preempted, StopSignals


STEPS = 6


def _no_compile(*args, **kwargs):
    raise AssertionError("compiled before the checkpoint was checked")


def _config(folder, output_dir, **sections) -> RunConfig:
    defaults = {"train": {"num_steps": STEPS}, "checkpoint": {"every": 2, "keep": 3, "async_save": False}}
    for name, values in sections.items():
        defaults[name] = {**defaults.get(name, {}), **values}
    raw = testing.tiny_run_config(str(folder), **defaults)
    raw["output_dir"] = str(output_dir)
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: checkpoints 2, 4, 6, its final params and metrics rows."""
    folder = tmp_path_factory.mktemp("reference")
    config = _config(folder, folder / "run")
    Trainer(config, log=lambda s: None).run()
    return folder, testing.final_params(config.output_dir), _metric_rows(config.output_dir)


def _metric_rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _copy(reference, tmp_path, **sections) -> RunConfig:
    folder, _, _ = reference
    shutil.copytree(folder / "run", tmp_path / "run")
    return _config(folder, tmp_path / "run", **sections)


def _assert_same_as_reference(reference, run_dir):
    _, expected, expected_rows = reference
    got = testing.final_params(run_dir)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    rows = _metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step, none redone twice
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in expected_rows]


def _largest_file(folder):
    files = [p for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


def _truncate_largest_data_file(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _break_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{not json")


def _delete_state_files(step_dir):
    for path in glob.glob(os.path.join(step_dir, "state", "*")):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@pytest.mark.parametrize("corrupt, error", [(_truncate_largest_data_file, "Exception"),
                                            (_break_metadata, "JSONDecodeError"),
                                            (_delete_state_files, "ValueError")])
def test_corrupt_newest_checkpoint_is_skipped_and_the_run_ends_exact(reference, tmp_path, caplog, corrupt, error):
    config = _copy(reference, tmp_path)
    ckpt = os.path.join(config.output_dir, "checkpoints")
    corrupt(os.path.join(ckpt, "6"))
    with caplog.at_level(logging.WARNING, logger="jaxencdec"):
        trainer = Trainer(config, log=lambda s: None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"checkpoint step 6 in {ckpt} cannot be restored ({error}"), warnings
    assert trainer.resumed_from == 4
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6.corrupt-1"]  # moved aside, so step 6 can be saved again
    result = trainer.run()
    assert result["step"] == STEPS and sorted(os.listdir(ckpt)) == ["2", "4", "6", "6.corrupt-1"]
    _assert_same_as_reference(reference, config.output_dir)


def _failing_reads(monkeypatch, failures: int, error: Exception) -> list[int]:
    """Makes the first ``failures`` checkpoint reads raise ``error`` (as a storage client does after its own
    retries); returns the list of the steps read, which grows as they are tried."""
    from jaxencdec.train import checkpoints

    read, tried = checkpoints.RunCheckpoints._read, []

    def flaky(self, step, target, scanned):
        tried.append(step)
        if len(tried) <= failures:
            raise error
        return read(self, step, target, scanned)

    monkeypatch.setattr(checkpoints.RunCheckpoints, "_read", flaky)
    monkeypatch.setattr(checkpoints, "RETRY_WAIT_S", 0.01)
    return tried


UNAVAILABLE = ValueError('UNAVAILABLE: Error reading "state/d/0" in OCDBT database: HTTP response code: 503')


def test_a_transient_storage_error_is_retried_and_moves_nothing(reference, tmp_path, caplog, monkeypatch):
    config = _copy(reference, tmp_path)
    ckpt = os.path.join(config.output_dir, "checkpoints")
    tried = _failing_reads(monkeypatch, 2, UNAVAILABLE)
    with caplog.at_level(logging.WARNING, logger="jaxencdec"):
        trainer = Trainer(config, log=lambda s: None)
    assert trainer.resumed_from == 6 and tried == [6, 6, 6]  # the newest, read again: not taken for damage
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(w.startswith(f"checkpoint step 6 in {ckpt}: storage error (ValueError: "
                                                   f"UNAVAILABLE") and "trying again in" in w for w in warnings)
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]
    trainer.run()
    _assert_same_as_reference(reference, config.output_dir)


def test_a_storage_error_that_persists_stops_the_resume_and_moves_nothing(reference, tmp_path, monkeypatch):
    config = _copy(reference, tmp_path)
    ckpt = os.path.join(config.output_dir, "checkpoints")
    tried = _failing_reads(monkeypatch, 100, TimeoutError("read timed out"))
    with pytest.raises(CheckpointError, match=rf"checkpoint step 6 in {re.escape(ckpt)} could not be read: the "
                                              r"store kept failing after 4 tries \(TimeoutError: read timed out\)\. "
                                              r"Nothing was moved or deleted; rerun the same command"):
        Trainer(config, log=lambda s: None)
    assert tried == [6] * 4  # never fell back to an older step
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]


def test_no_restorable_checkpoint_is_a_clear_error_that_moves_nothing(reference, tmp_path):
    config = _copy(reference, tmp_path)
    ckpt = os.path.join(config.output_dir, "checkpoints")
    for step in ("2", "4", "6"):
        _break_metadata(os.path.join(ckpt, step))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints can be restored \(step 6: "
                                              r"JSONDecodeError.*step 2: .*new output_dir"):
        Trainer(config, log=lambda s: None)
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]


def test_resume_from_a_chosen_checkpoint(reference, tmp_path):
    config = _copy(reference, tmp_path, checkpoint={"every": 2, "keep": 3, "async_save": False,
                                                    "resume_step": 3})
    ckpt = os.path.join(config.output_dir, "checkpoints")
    with pytest.raises(RunConfigError, match=r"checkpoint.resume_step 3: there is no such checkpoint .*"
                                             r"\(kept steps: 2, 4, 6\)"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(jax, "jit", _no_compile)  # checked before anything compiles
            Trainer(config, log=lambda s: None)
    config = config.replace(checkpoint=dataclasses.replace(config.checkpoint, resume_step=2))
    lines = []
    trainer = Trainer(config, log=lines.append)
    assert trainer.resumed_from == 2 and f"resumed from checkpoint step 2 in {ckpt}" in lines
    assert sorted(os.listdir(ckpt)) == ["2", "4.discarded-1", "6.discarded-1"]
    # metrics.jsonl already holds only the rows up to the chosen step
    assert [r["step"] for r in _metric_rows(config.output_dir)] == [1, 2]
    trainer.run()
    assert sorted(os.listdir(ckpt)) == ["2", "4", "4.discarded-1", "6", "6.discarded-1"]
    _assert_same_as_reference(reference, config.output_dir)


def test_divergence_names_the_checkpoint_to_resume_from(tmp_path):
    # the learning rate is 0 for step 1 (warm-up starts at 0), then huge: step 2 blows the params up, and the
    # loss of step 3 is not finite. The checkpoint of step 2 exists but holds exploded params.
    config = _config(tmp_path, tmp_path / "run", optim={"learning_rate": 1e20, "warmup_steps": 2},
                     checkpoint={"every": 1, "keep": 3, "async_save": False})
    trainer = Trainer(config, log=lambda s: None)
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.run()
    message = str(caught.value)
    assert "\n" not in message
    assert "at step 3: training stopped" in message
    listing = message.split("norm of the kept checkpoints in ")[1].split(";")[0]
    norms = {int(step): float(norm) for step, norm in re.findall(r"step (\d+)(?: \(start\))? ([^,;]+)", listing)}
    assert sorted(norms) == [0, 1, 2]
    assert norms[1] == pytest.approx(norms[0], rel=1e-3) and norms[2] > 1e15
    assert "the norm jumps at step 2" in message and "--set checkpoint.resume_step=1" in message
    assert "checkpoint.allow_schedule_change=true" in message

    # the advice works: from step 1 with a sane learning rate (a schedule change, so it must be allowed)
    sane = config.replace(optim=dataclasses.replace(config.optim, learning_rate=1e-3),
                          checkpoint=dataclasses.replace(config.checkpoint, resume_step=1))
    with pytest.raises(RunConfigError, match=r"optim.learning_rate 1e\+20 -> 0.001"):
        Trainer(sane, log=lambda s: None)
    sane = sane.replace(checkpoint=dataclasses.replace(sane.checkpoint, allow_schedule_change=True))
    again = Trainer(sane, log=lambda s: None)
    assert again.resumed_from == 1
    assert again.run()["step"] == STEPS
    assert all(np.all(np.isfinite(x)) for x in testing.final_params(sane.output_dir).values())


def test_changed_schedule_is_refused_unless_allowed(reference, tmp_path, caplog):
    config = _copy(reference, tmp_path, train={"num_steps": STEPS + 4})
    ckpt = os.path.join(config.output_dir, "checkpoints")
    with pytest.raises(RunConfigError, match=r"checkpoint step 6 in .* another learning-rate schedule "
                                             r"\(train.num_steps 6 -> 10: the learning rate of step 7 becomes "
                                             r"0.0005 instead of 0\).*new output_dir.*allow_schedule_change=true"):
        Trainer(config, log=lambda s: None)
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]
    allowed = config.replace(checkpoint=dataclasses.replace(config.checkpoint, allow_schedule_change=True))
    with caplog.at_level(logging.WARNING, logger="jaxencdec"):
        trainer = Trainer(allowed, log=lambda s: None)
    assert trainer.resumed_from == 6 and "changed learning-rate schedule" in caplog.text
    trainer.close()


def test_schedule_changes_ignores_num_steps_for_a_constant_schedule(tmp_path):
    config = _config(tmp_path, tmp_path / "run", optim={"schedule": "constant", "warmup_steps": 2})
    saved = config.to_dict()
    saved["train"]["num_steps"] = 3
    assert schedule_changes(saved, config) == {}
    saved["optim"]["warmup_steps"] = 5
    assert schedule_changes(saved, config) == {"optim.warmup_steps": (5, 2)}
    saved["optim"]["schedule"] = "linear"
    assert set(schedule_changes(saved, config)) == {"optim.warmup_steps", "optim.schedule", "train.num_steps"}


def test_a_first_signal_is_recorded_for_the_step_boundary_and_a_second_interrupts_at_once():
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals(multi_process=False) as stop:
        assert not stop.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, nothing interrupted
        assert stop.reached(1) and stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: Ctrl-C's own behaviour, at once
            time.sleep(5)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous


def test_preempted_names_the_step_the_folder_and_what_to_do():
    stopped = Preempted("SIGTERM", 7, "gs://bucket/run/checkpoints")
    assert stopped.exit_status == 143
    assert str(stopped) == ("stopped by SIGTERM: checkpoint step 7 saved in gs://bucket/run/checkpoints; rerun the "
                            "same command to resume")
