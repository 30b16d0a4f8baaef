"""What a user sees: the start-up lines, eval lines printed above the progress bar, one metric naming scheme
(metrics.jsonl, the final JSON, best-model selection; older names still read), the plot's labels, metric
packages checked before anything compiles, BLEU, `jaxencdec eval` without a checkpoint, and the warning of
`jaxencdec generate` for an empty output."""

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import testing
from jaxencdec.cli import main
from jaxencdec.config import EncoderDecoderConfig, HFConfig
from jaxencdec.generation.config import GenerationConfig
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.train.config import EvalSection, RunConfig, RunConfigError
from jaxencdec.train.loop import Trainer
from jaxencdec.train.metrics import MetricsWriter, text_metrics



def _no_compile(*args, **kwargs):
    raise AssertionError("compiled before the config was checked")


def test_start_up_lines_eval_above_the_bar_and_one_naming_scheme(tmp_path):
    config = RunConfig.from_dict(testing.tiny_run_config(
        str(tmp_path), train={"num_steps": 6, "progress_bar": True},
        eval={"every": 4, "batch_size": 4, "max_batches": 1, "generate": True, "metric": "bleu", "num_beams": 2,
              "max_new_tokens": 4, "best_metric": "eval/bleu", "best_mode": "max"},
        checkpoint={"every": 2, "keep": 1, "export_final": False}))
    terminal = io.StringIO()  # stdout and stderr (the bar) interleaved, as on a terminal
    with contextlib.redirect_stdout(terminal), contextlib.redirect_stderr(terminal):
        trainer = Trainer(config)
        result = trainer.run()
    lines = terminal.getvalue().split("\n")
    shown = [line.split("\r")[-1] for line in lines]  # what a terminal shows of each line
    device = jax.devices()[0]
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.params))
    start_up = [f"devices: {jax.device_count()} x {device.device_kind} (platform {device.platform})",
                "mesh: data 1, fsdp 1, model 1", f"parameters: {count:,} (all trainable)",
                "compiling the train step..."]
    assert shown[:4] == start_up, lines[:6]
    assert re.fullmatch(r"train step compiled in \d+\.\d s", shown[4]), lines[:6]
    assert re.fullmatch(r"token efficiency: \d+\.\d% of this process's token slots hold tokens in the first batch "
                        r"\(data.packing false; logged as train/token_efficiency\)", shown[5]), lines[:6]

    # the eval line is written above the bar (the bar's line is cleared first), not appended to it
    eval_line = next(line for line in lines if "eval/loss" in line)
    assert eval_line.split("\r")[-1].startswith("step 4: eval/loss "), repr(eval_line)
    assert re.search(r"eval/tokens \d+, eval/bleu \d+\.\d{4} \(best\)$", eval_line)

    rows = [json.loads(line) for line in open(os.path.join(trainer.out_dir, "metrics.jsonl"))]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [set(r) for r in eval_rows] == [{"step", "eval/loss", "eval/tokens", "eval/bleu"}]
    assert isinstance(eval_rows[0]["eval/tokens"], int)
    assert {k for r in rows if "train/loss" in r for k in r} == {
        "step", "train/loss", "train/grad_norm", "train/learning_rate", "train/step_time", "train/tokens_per_s",
        "train/token_efficiency", "train/data_time"}
    # the final JSON's eval is the last one, labelled with its step (4, the run ended at 6)
    assert result["eval"] == eval_rows[0]
    assert result["best"]["metric"] == "eval/bleu" and result["best"]["step"] == 4


def test_a_missing_metric_package_fails_before_any_compile(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    monkeypatch.setattr(jax, "jit", _no_compile)
    raw = testing.tiny_run_config(str(tmp_path), eval={"every": 2, "generate": True, "metric": "bleu"})
    with pytest.raises(RunConfigError, match=r"eval.metric 'bleu' needs the sacrebleu package, which is not "
                                             r"installed: pip install sacrebleu"):
        Trainer(RunConfig.from_dict(raw))
    assert not os.path.exists(raw["output_dir"])


def test_text_metrics_are_on_a_0_to_100_scale():
    same = ["graph based methods for question answering"]
    assert text_metrics("bleu", same, same) == {"bleu": pytest.approx(100.0)}
    assert text_metrics("rouge", same, same) == {k: pytest.approx(100.0) for k in ("rouge1", "rouge2", "rougeL")}
    half = text_metrics("rouge", ["graph methods"], ["graph based methods for question answering"])
    # ROUGE-1 F1: precision 2/2, recall 2/6 -> 2 * 1 * (1/3) / (4/3) = 0.5
    assert half["rouge1"] == pytest.approx(50.0)
    assert text_metrics("bleu", ["completely different words here"], same)["bleu"] == pytest.approx(0.0)


def test_older_metric_names_are_still_read(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 2, "train/loss": 4.0}) + "\n")
        f.write(json.dumps({"step": 2, "eval_loss": 3.5, "eval_tokens": 40.0, "rougeL": 12.0}) + "\n")
        f.write('{"step": 3, "train/lo')  # a line cut by a kill
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    assert writer.read() == {"train/loss": [(2, 4.0)], "eval/loss": [(2, 3.5)], "eval/tokens": [(2, 40.0)],
                             "eval/rougeL": [(2, 12.0)]}
    assert writer.last_eval(10) == {"step": 2, "eval/loss": 3.5, "eval/tokens": 40.0, "eval/rougeL": 12.0}
    assert writer.last_eval(1) == {}
    assert EvalSection(best_metric="rougeL", best_mode="max").best_metric == "eval/rougeL"
    assert EvalSection(best_metric="eval_loss").best_metric == "eval/loss"
    with pytest.raises(RunConfigError, match=r"eval.best_metric 'eval/bleu' is not a metric of this eval .*"
                                             r"eval/loss, eval/rouge1, eval/rouge2, eval/rougeL"):
        EvalSection(best_metric="bleu")


def test_a_fresh_writer_drops_rows_of_steps_to_be_redone(tmp_path):
    rows = [{"step": s, "train/loss": float(s)} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "tr')
    MetricsWriter(str(tmp_path), tensorboard=False, keep_through_step=2).write(3, {"train/loss": 9.0})
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == rows[:2] + [{"step": 3, "train/loss": 9.0}]


TENSORBOARD_WITHOUT_TORCH = """
import os, sys
from jaxencdec.train.metrics import MetricsWriter
if sys.argv[2] == "torch imported":
    import torch
writer = MetricsWriter(sys.argv[1], tensorboard=True)
writer.write(1, {"train/loss": 2.0})
writer.close()
print(sorted(os.listdir(os.path.join(sys.argv[1], "tensorboard"))), "torch" in sys.modules,
      sys.modules.get("torch") is not None)
"""


@pytest.mark.parametrize("before", ["torch imported", "torch not imported"])
def test_tensorboard_events_are_written_and_torch_is_imported_only_by_whoever_asked(before, tmp_path):
    """tensorboardX imports torch when it is installed (annotations only, ~1.5 s): the writer hides it from
    tensorboardX, and leaves torch imported for code that imported it."""
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-c", TENSORBOARD_WITHOUT_TORCH, str(tmp_path), before],
                          capture_output=True, text=True, timeout=120, env=testing.subprocess_env(None))
    assert done.returncode == 0, done.stderr[-3000:]
    events, imported, usable = done.stdout.strip().rsplit(" ", 2)
    assert "tfevents" in events
    assert imported == usable == str(before == "torch imported")


def test_plot_has_axis_labels_the_run_name_and_distinct_rouge_lines(tmp_path):
    run = tmp_path / "my_run"
    run.mkdir()
    writer = MetricsWriter(str(run), tensorboard=False)
    for step in (1, 2, 3, 4):
        writer.write(step, {"train/loss": 5.0 - step, "train/learning_rate": 1e-3})
    for step in (2, 4):
        writer.write(step, {"eval/loss": 4.0, "eval/tokens": 50, "eval/rouge1": 30.0, "eval/rouge2": 10.0,
                            "eval/rougeL": 28.0})
    fig = writer.figure()
    assert fig._suptitle.get_text() == "my_run"
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (token cross-entropy)", "learning rate",
                                                   "ROUGE F1 (x 100)"]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)
    rouge = fig.axes[2].get_lines()
    assert [line.get_label() for line in rouge] == ["eval/rouge1", "eval/rouge2", "eval/rougeL"]
    assert len({(line.get_linestyle(), line.get_marker()) for line in rouge}) == 3
    assert os.path.getsize(writer.plot()) > 1000


def test_eval_without_a_checkpoint_fails_at_once_and_writes_nothing(tmp_path, monkeypatch, capsys):
    raw = testing.tiny_run_config(str(tmp_path))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    monkeypatch.setattr(jax, "jit", _no_compile)
    assert main(["eval", str(path)]) == 1
    out = raw["output_dir"]
    assert capsys.readouterr().err.strip() == (f"jaxencdec: error: no checkpoint in {out}/checkpoints: train first "
                                               f"(jaxencdec train CONFIG) or pass --model FOLDER")
    assert not os.path.exists(out)


def test_generate_warns_when_an_output_is_only_special_tokens(tmp_path, capsys):
    tokenizer = testing.write_vocab(str(tmp_path / "model"))
    vocab = testing.vocab_size(tokenizer)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        HFConfig.from_dict(testing.tiny_bert(vocab, layers=1)), HFConfig.from_dict(testing.tiny_bert(vocab, layers=1)),
        decoder_start_token_id=2, pad_token_id=0, eos_token_id=3)
    # an untrained model's way of saying nothing: end of sequence straight after the start token
    generation = GenerationConfig.from_model_config(config).replace(forced_bos_token_id=3, max_new_tokens=2)
    EncoderDecoderModel(config, seed=0, generation_config=generation).save_pretrained(str(tmp_path / "model"))
    assert main(["generate", "--model", str(tmp_path / "model"), "--text", "we propose a method"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n"
    assert captured.err.strip() == ("jaxencdec: warning: input 1 generated only special tokens [2, 3]: the model "
                                    "may be undertrained")
