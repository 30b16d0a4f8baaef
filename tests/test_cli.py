"""The ``jaxencdec`` command: help, one-line errors (tracebacks only with --debug), and train -> eval ->
generate with configs/aclsum_tiny_cpu.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import testing
from jaxencdec.cli import build_parser, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cli(*args, env=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "jaxencdec.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env or testing.subprocess_env(None), input=stdin)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("train", "eval", "generate", "--debug", "examples:"):
        assert word in out
    for command in ("train", "eval", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: jaxencdec " + command in capsys.readouterr().out
    args = build_parser().parse_args(["train", "c.json", "--set", "a.b=1", "--set", "c=x"])
    assert args.overrides == ["a.b=1", "c=x"]


@pytest.mark.parametrize("args, message", [
    (["train", "/nonexistent.json"], "config file /nonexistent.json does not exist"),
    (["generate", "--model", "/nonexistent/model", "--text", "hi"], "model folder /nonexistent/model does not exist"),
])
def test_errors_are_one_line(capsys, args, message):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"jaxencdec: error: {message}"


def test_bad_override_one_line_then_traceback_with_debug(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(testing.tiny_run_config(str(tmp_path))))
    assert main(["train", str(path), "--set", "train.bogus=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxencdec: error: unknown config key(s) train.bogus") and "\n" not in err
    proc = _cli("--debug", "train", str(path), "--set", "mesh.data=3")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "needs 3 devices" in proc.stderr


@pytest.mark.slow
def test_tiny_config_learns_enough_to_evaluate_and_generate(tmp_path):
    """configs/aclsum_tiny_cpu.json as a user runs it: the start-up lines, ROUGE above 0, a read-only eval and a
    non-empty generated title."""
    out = tmp_path / "run"
    config = [str(CONFIGS / "aclsum_tiny_cpu.json"), "--set", f"output_dir={out}"]
    # compiled as a user's run is: XLA's full optimization runs the 200 steps and the evaluations in less time
    # than the test run's fast-compile flags save
    env = testing.without_fast_compile_flags(testing.subprocess_env(None))
    train = _cli("train", *config, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    lines = train.stdout.splitlines()
    assert lines[0].startswith("devices: ") and lines[1] == "mesh: data 1, fsdp 1, model 1"
    assert lines[2] == "parameters: 4,146,490 (all trainable)" and lines[3] == "compiling the train step..."
    assert lines[4].startswith("train step compiled in ")
    result = json.loads(lines[-1])
    assert result["step"] == 200 and result["eval"]["step"] == 200
    assert result["eval"]["eval/rouge1"] > 0 and result["eval"]["eval/rougeL"] > 0, result["eval"]

    events = sorted(os.listdir(out / "tensorboard"))
    ev = _cli("eval", *config, "--max-batches", "1", "--no-generate", env=env)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "resumed from" not in ev.stdout and f"evaluating checkpoint step 200 in {out}/checkpoints" in ev.stdout
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 200 and metrics["eval/loss"] > 0 and isinstance(metrics["eval/tokens"], int)
    assert sorted(os.listdir(out / "tensorboard")) == events  # eval writes nothing

    gen = _cli("generate", "--model", result["final_model"], "--text", "We propose a neural model for machine "
               "translation that attends over the source sentence.", "--jsonl", env=env, stdin="")
    assert gen.returncode == 0, gen.stderr[-3000:]
    rows = [json.loads(line) for line in gen.stdout.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["output"].strip(), rows
    assert "warning" not in gen.stderr
