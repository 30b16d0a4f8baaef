"""`jaxencdec compile`: a run's programs compiled ahead of time for a TPU slice on this (CPU) machine with libtpu.

The compiles run in child processes: JAX_PLATFORMS=cpu must be set before jax is imported, and libtpu is loaded
once per process (ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets the two test workers each load it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import testing
from jaxencdec.parallel import topology
from jaxencdec.train import compile as aot

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install "jaxencdec[tpu]")')


def tpu_env(folder) -> dict[str, str]:
    """A child's environment for compiling with libtpu: no TPU looked for, XLA's flags as a user has them (the test
    run's faster XLA:CPU flags taken out), libtpu's logs in ``folder`` (not /tmp/tpu_logs)."""
    env = {k: v for k, v in testing.without_fast_compile_flags(os.environ).items()
           if not k.startswith("JAX_") or k == "JAX_ENABLE_X64"}
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost",
               TPU_LOG_DIR=str(folder / "tpu_logs"), PYTHONUNBUFFERED="1")
    return env


def jaxencdec(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxencdec.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def write_config(folder, **sections) -> str:
    """A tiny randomly initialized bert2bert whose tokenizer and data files do not exist: compiling reads neither."""
    part = {"model_type": "bert", "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128}
    config = {
        "output_dir": str(folder / "run"),
        "model": {"encoder_config": part, "decoder_config": part, "tokenizer": str(folder / "no-tokenizer"),
                  "decoder_start_token_id": 1, "pad_token_id": 0, "eos_token_id": 2},
        "data": {"format": "jsonl", "train_file": str(folder / "no-train.jsonl"),
                 "eval_file": str(folder / "no-eval.jsonl"), "source_field": "article", "target_field": "summary",
                 "max_source_length": 64, "max_target_length": 32},
        "train": {"batch_size": 8, "num_steps": 10},
        "mesh": {"data": -1},
        "eval": {"every": 5, "batch_size": 8, "generate": True, "num_beams": 2, "max_new_tokens": 8},
    }
    for name, values in sections.items():
        config[name] = {**config[name], **values}
    path = folder / "tiny.json"
    path.write_text(json.dumps(config))
    return str(path)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """``program -> its table cells`` (split on runs of two or more spaces)."""
    import re

    rows = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in aot.PROGRAMS:
            rows[cells[0]] = cells
    return rows


# ---------------------------------------------------------------------- names (no libtpu)


@pytest.mark.parametrize("name, jax_name, chips, options", [
    ("v5e-64", "v5e:8x8", 64, {}),
    ("v5litepod-64", "v5e:8x8", 64, {}),
    ("v5e-1", "v5e:1x1", 1, {"chips_per_host_bounds": (1, 1, 1)}),
    ("v5e-4", "v5e:2x2", 4, {}),
    ("v5e-8", "v5e:2x4", 8, {"chips_per_host_bounds": (2, 4, 1)}),
    ("v5e-32", "v5e:4x8", 32, {}),
    ("v5e-128", "v5e:8x16", 128, {}),
    ("v5e-256", "v5e:16x16", 256, {}),
    ("v6e-256", "v6e:16x16", 256, {}),
    ("v4-8", "v4:2x2x1", 4, {"chip_config_name": "megacore"}),
    ("v4-32", "v4:2x2x4", 16, {"chip_config_name": "megacore"}),
    ("v4-64", "v4:2x4x4", 32, {"chip_config_name": "megacore"}),
    ("v4-128", "v4:4x4x4", 64, {"chip_config_name": "megacore"}),
    ("v4-4096", "v4:8x16x16", 2048, {"chip_config_name": "megacore"}),
    ("v5p-128", "v5p:4x4x4", 64, {"chip_config_name": "megacore"}),
    ("v2-8", "v2:2x2", 4, {}),
    ("v3-8", "v3:2x2", 4, {}),
    ("v3-32", "v3:4x4", 16, {}),
    ("v5e:2x2", "v5e:2x2", 4, {}),  # jax's own strings pass as they are
    ("v4:2x2x4", "v4:2x2x4", 16, {}),
    ("v6e:1x1", "v6e:1x1", 1, {"chips_per_host_bounds": (1, 1, 1)}),
])
def test_topology_names(name, jax_name, chips, options):
    resolved = topology.resolve_topology(name)
    assert (resolved.jax_name, resolved.chips, dict(resolved.options)) == (jax_name, chips, options)


@pytest.mark.parametrize("name, says", [
    ("v7-8", "unknown topology 'v7-8'"), ("tpu", "unknown topology"), ("v5e-2", "not a v5e slice"),
    ("v4-31", "not a v4 slice"), ("v5e-512", "v5e-1/4/8/16/32/64/128/256"),
])
def test_unknown_topology_lists_the_names(name, says):
    with pytest.raises(topology.TopologyError) as error:
        topology.resolve_topology(name)
    assert says in str(error.value)
    if "unknown" in says:
        for listed in ("v4-8/16/32", "v5e-1/4/8", "v5p-8/16", "v6e-1/4", "v2-8/16", "v3-8/16", "v5e:2x2"):
            assert listed in str(error.value)


def test_out_of_memory_messages_parse():
    oom = topology.parse_out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                                       "for HLO temporaries (16.94G) exceeds available HBM (15.75G).\nmore")
    assert (oom.what, oom.needed, oom.available) == ("HLO temporaries", int(16.94 * 2**30), int(15.75 * 2**30))
    oom = topology.parse_out_of_memory("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
                                       "in memory space hbm. Used 20.50G of 15.75G hbm. "
                                       "Exceeded hbm capacity by 4.75G.")
    assert (oom.needed, oom.available) == (int(20.5 * 2**30), int(15.75 * 2**30))
    assert topology.parse_out_of_memory("INVALID_ARGUMENT: something else") is None


def test_without_libtpu_the_message_names_the_install_line(tmp_path, monkeypatch, capsys):
    """What a machine without libtpu sees: jax's get_topology_desc fails the way it does there."""
    import jax
    from jax.experimental import topologies

    from jaxencdec import cli

    def not_installed(*args, **kwargs):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See "
                           "https://github.com/jax-ml/jax#installation")

    monkeypatch.setattr(topologies, "get_topology_desc", not_installed)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cli.main(["compile", write_config(tmp_path), "--topology", "v5e-4"]) == 1
    err = capsys.readouterr().err
    assert f'pip install "jax[tpu]=={jax.__version__}"' in err and 'pip install "jaxencdec[tpu]"' in err, err


def test_unknown_topology_fails_before_any_work(tmp_path, capsys):
    from jaxencdec import cli

    assert cli.main(["compile", write_config(tmp_path), "--topology", "v9-8"]) == 1
    assert "unknown topology 'v9-8'" in capsys.readouterr().err


def test_topology_needs_compile_only(tmp_path, capsys):
    from jaxencdec import cli

    assert cli.main(["train", write_config(tmp_path), "--topology", "v5e-4"]) == 1
    assert "--compile-only" in capsys.readouterr().err


# ---------------------------------------------------------------------- compiles


@pytest.mark.slow
@needs_libtpu
def test_compile_for_v5e_2x2_prints_the_three_programs(tmp_path):
    result = jaxencdec("compile", write_config(tmp_path), "--topology", "v5e:2x2", env=tpu_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("v5e:2x2: 4 x TPU v5 lite, 15.75 GiB HBM each (as XLA reports)"), out
    assert "mesh data 4 x fsdp 1 x model 1" in out
    rows = table_rows(out)
    assert list(rows) == ["train", "eval", "generate"], out
    assert rows["train"][1] == "8 x (64+32)" and rows["generate"][1] == "8 x 64, 2 beams, 8 new"
    for cells in rows.values():
        assert cells[7].endswith("%") and float(cells[7][:-1]) > 90, cells  # headroom of a tiny model
        assert float(cells[-1]) > 0  # compile seconds
    assert not (tmp_path / "run").exists()  # compiling writes nothing


@pytest.mark.slow
@needs_libtpu
def test_a_run_that_does_not_fit_fails_with_the_levers(tmp_path):
    """A tiny model at a batch no chip holds: XLA's RESOURCE_EXHAUSTED comes early in the compile (seconds)."""
    config = write_config(tmp_path, train={"batch_size": 65536}, eval={"every": -1})
    result = jaxencdec("compile", config, "--topology", "v5e-1", env=tpu_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "DOES NOT FIT" in table_rows(result.stdout)["train"]
    assert "eval: not compiled (eval.every is -1)" in result.stdout
    err = result.stderr
    assert "train (65536 x (64+32)) does not fit v5e-1 (v5e:1x1)" in err and "15.75 GiB" in err, err
    for lever in ("--set train.micro_batches=", "--set model.remat=full", "--set model.compute_dtype=bfloat16"):
        assert lever in err, err


@pytest.mark.slow
def test_train_compile_only_on_the_local_devices(tmp_path):
    """Without --topology: this machine's devices (here 4 CPU devices), nothing trained or written."""
    config = write_config(tmp_path, mesh={"data": 2, "fsdp": 2})
    result = jaxencdec("train", config, "--compile-only", env=testing.subprocess_env(4))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("local devices: 4 x cpu"), result.stdout
    assert "mesh data 2 x fsdp 2 x model 1" in result.stdout
    assert list(table_rows(result.stdout)) == ["train", "eval", "generate"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compile_run_returns_the_numbers(tmp_path):
    """The function behind both commands, in this process on its CPU device: numbers, not text."""
    from jaxencdec.train.config import RunConfig

    config = RunConfig.from_json_file(write_config(tmp_path, eval={"generate": False}))
    report = aot.compile_run(config, programs=("train", "eval"))
    assert [p.name for p in report.programs] == ["train", "eval"] and report.skipped == {
        "generate": "eval.generate is false"}
    train = report.program("train")
    assert train.arguments_bytes > 3 * 4 * report.num_parameters // report.num_devices  # params + two moments
    assert train.alias_bytes > 0  # the state is donated
    assert train.model_flops > 0 and train.compile_seconds > 0
    assert report.fits and not report.quick and "--quick" not in aot.format_report(report)
    # --quick: the same program built with XLA's least optimization effort, and the report says so
    quick = aot.compile_run(config, programs=("eval",), quick=True)
    assert quick.quick and quick.program("eval").arguments_bytes == report.program("eval").arguments_bytes
    assert "note: compiled --quick" in aot.format_report(quick)


def test_libtpu_flags_are_added_once_and_a_given_value_wins():
    from jaxencdec.parallel.libtpu_flags import FSDP_LAYOUT_FLAGS, add_libtpu_flags

    env = {}
    assert add_libtpu_flags(env).split() == list(FSDP_LAYOUT_FLAGS)
    assert add_libtpu_flags(env).split() == list(FSDP_LAYOUT_FLAGS)  # nothing added twice
    env = {"LIBTPU_INIT_ARGS": "--xla_tpu_assign_all_reduce_scatter_layout=false --xla_enable_async_all_gather=true"}
    flags = add_libtpu_flags(env).split()
    assert flags[:2] == ["--xla_tpu_assign_all_reduce_scatter_layout=false", "--xla_enable_async_all_gather=true"]
    assert sorted(flags[2:]) == sorted(f for f in FSDP_LAYOUT_FLAGS if "assign_all_reduce_scatter" not in f)


@pytest.mark.parametrize("command, adds", [("train", True), ("eval", True), ("compile", True), ("generate", False),
                                           ("export", False)])
def test_the_commands_that_build_the_run_programs_set_the_libtpu_flags(command, adds, monkeypatch):
    """Before a command runs (and so before libtpu starts): train, eval and compile build the programs the flags are
    for; generate and export leave libtpu's defaults."""
    from jaxencdec import cli

    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")  # (restored after the test, as the command leaves it set)
    seen = {}

    def run(args) -> int:
        seen["flags"] = os.environ["LIBTPU_INIT_ARGS"]
        return 0

    monkeypatch.setitem(cli.COMMANDS, command, run)
    args = {"train": ["run.json"], "eval": ["run.json"], "compile": ["run.json"], "generate": ["--model", "m"],
            "export": ["m", "out"]}[command]
    assert cli.main([command, *args]) == 0
    assert ("--xla_tpu_assign_all_reduce_scatter_layout=true" in seen["flags"]) == adds, seen
