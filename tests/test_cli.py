"""The ``jaxencdec`` command: help, one-line errors (tracebacks only with --debug), and train -> eval ->
generate on a tiny model."""

import json
import subprocess
import sys

import pytest

from jaxencdec.cli import build_parser, main
from jaxencdec.train import testing


def _cli(*args, env=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "jaxencdec.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env or testing.subprocess_env(None), input=stdin)


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


def test_train_eval_generate(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(testing.tiny_run_config(str(tmp_path), train={"num_steps": 2},
                                                       eval={"batch_size": 2})))
    train = _cli("train", str(path))
    assert train.returncode == 0, train.stderr[-3000:]
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert result["step"] == 2

    ev = _cli("eval", str(path), "--max-batches", "2")
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["eval_loss"] > 0 and metrics["eval_tokens"] > 0

    gen = _cli("generate", "--model", result["final_model"], "--text", "we propose a method",
               "--max-new-tokens", "3", "--num-beams", "2", "--jsonl", stdin="")
    assert gen.returncode == 0, gen.stderr[-3000:]
    rows = [json.loads(l) for l in gen.stdout.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["input"] == "we propose a method" and isinstance(rows[0]["output"], str)
