"""The loop end to end on a tiny model (in this process, one device): eval with beam search and ROUGE,
metrics files, exports; the model handed to the Trainer is left as it was; NaN stops the run with the last good
checkpoint intact; bad configs fail before any compile."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import testing
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train import loop, model_bundle
from jaxencdec.train.config import RunConfig, RunConfigError
from jaxencdec.train.loop import Trainer, TrainingDivergedError, validate




@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    config = RunConfig.from_dict(testing.tiny_run_config(
        str(folder), train={"num_steps": 4, "tensorboard": True, "plot": True},
        eval={"every": 2, "batch_size": 4, "generate": True, "num_beams": 2, "max_new_tokens": 4,
              "best_metric": "eval/loss", "best_mode": "min",
              "generation": {"repetition_penalty": 1.3, "encoder_repetition_penalty": 2.0, "min_new_tokens": 2,
                             "forced_bos_token_id": 7}},
        checkpoint={"every": 2, "keep": 1}))
    lines = []
    trainer = Trainer(config, log=lines.append)
    result = trainer.run()
    return trainer, result, lines


def test_run_writes_metrics_plots_and_models(finished):
    trainer, result, lines = finished
    out = trainer.out_dir
    assert result["step"] == 4 and result["resumed_from"] is None
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["train/tokens_per_s"] > 0 and r["train/step_time"] > 0 and r["train/data_time"] >= 0
               for r in train_rows)
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert all({"eval/rouge1", "eval/rouge2", "eval/rougeL"} <= set(r) for r in eval_rows)
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 1000  # the test extra installs both writers
    assert any(n.startswith("events") for n in os.listdir(os.path.join(out, "tensorboard")))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4"]  # keep=1
    assert result["best"]["step"] in (2, 4)
    assert any(l.startswith("step 4: eval/loss ") for l in lines)
    assert result["eval"] == eval_rows[-1]  # labelled with its step
    # one shape bucket: four train steps and two evals each compiled exactly once
    assert trainer.train_step._cache_size() == 1 and trainer.eval_step._cache_size() == 1


def test_exported_model_loads_and_matches(finished):
    trainer, result, _ = finished
    model = EncoderDecoderModel.from_pretrained(result["final_model"])
    live = traverse_util.flatten_dict(jax.tree.map(np.asarray, trainer.state.params), sep="/")
    loaded = traverse_util.flatten_dict(jax.tree.map(np.asarray, model.params), sep="/")
    assert all(np.array_equal(live[k], loaded[k]) for k in live)
    assert model.generation_config.num_beams == 2
    assert os.path.isfile(os.path.join(result["final_model"], "tokenizer.json"))  # Tokenizer.save_pretrained's
    text = "the quick brown fox"
    assert Tokenizer.from_pretrained(result["final_model"])(text)["input_ids"].tolist() == \
        trainer.bundle.tokenizer(text)["input_ids"].tolist()
    assert os.path.isfile(os.path.join(trainer.out_dir, "best_model", "flax_model.msgpack"))


def test_the_exported_model_decodes_as_the_eval_did(finished, capsys):
    """final_model's generation_config.json holds the eval's decoding and its tokenizer the source length: the
    model's generate, and `jaxencdec generate` on its folder, give the eval's ids for the eval's inputs."""
    from jaxencdec import cli
    from jaxencdec.train.pipeline import eval_batches

    trainer, result, _ = finished
    model = EncoderDecoderModel.from_pretrained(result["final_model"])
    assert model.generation_config == trainer.config.eval.generation_config(trainer.model.config)
    assert (model.generation_config.repetition_penalty, model.generation_config.forced_bos_token_id) == (1.3, 7)
    local = next(eval_batches(trainer.eval_pairs, trainer.encoder, 4))
    batch = trainer.device_batch(local)
    evaluated = np.asarray(trainer.generate_fn()(trainer.state.params, batch["input_ids"], batch["attention_mask"],
                                                 jax.random.key(0)))
    assert (evaluated[:, 1] == 7).all()  # the forced first token
    sources = [trainer.eval_pairs[i][0] for i in local["example_index"]]
    tokenizer = Tokenizer.from_pretrained(result["final_model"])
    assert tokenizer.model_max_length == trainer.config.data.max_source_length
    enc = tokenizer(sources, truncation=True, padding="longest")
    generated = np.asarray(model.generate(enc["input_ids"], enc["attention_mask"]))
    np.testing.assert_array_equal(generated, evaluated[:, :generated.shape[1]])
    assert (evaluated[:, generated.shape[1]:] == trainer.model.config.pad_token_id).all()

    assert cli.main(["generate", "--model", result["final_model"], "--batch-size", "4", "--jsonl",
                     *(arg for source in sources for arg in ("--text", source))]) == 0
    printed = [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]
    assert printed == trainer.bundle.decoder_tokenizer.batch_decode(evaluated, skip_special_tokens=True)


def test_freeze_trains_only_the_rest(tmp_path):
    config = RunConfig.from_dict(testing.tiny_run_config(
        str(tmp_path), optim={"learning_rate": 1e-2, "freeze": ["^encoder/", "decoder/embeddings/"]},
        train={"num_steps": 2}, checkpoint={"every": 2, "keep": 1, "export_final": False}))
    lines = []
    trainer = Trainer(config, log=lines.append)
    start = traverse_util.flatten_dict(jax.device_get(trainer.state.params), sep="/")  # as the run starts
    trainer.run()
    end = traverse_util.flatten_dict(jax.device_get(trainer.state.params), sep="/")
    frozen = [n for n in start if n.startswith(("encoder/", "decoder/embeddings/"))]
    total, fixed = sum(x.size for x in start.values()), sum(start[n].size for n in frozen)
    assert f"parameters: {total:,} ({total - fixed:,} trainable, {fixed:,} frozen by optim.freeze)" in lines
    assert frozen and all(np.array_equal(end[n], start[n]) for n in frozen)
    assert all(not np.array_equal(end[n], start[n]) for n in start if n.endswith("kernel") and n not in frozen)


def test_the_given_model_is_left_as_it_was(tmp_path, monkeypatch):
    """The Trainer trains on devices from its own copy: the model of the bundle it is handed keeps its config and
    its very param arrays, values included, through a run."""
    config = RunConfig.from_dict(testing.tiny_run_config(
        str(tmp_path), train={"num_steps": 2}, checkpoint={"every": 2, "keep": 1, "export_final": False}))
    built = model_bundle.build_model(config)  # a random init: give it params, as a loaded model has
    given = dataclasses.replace(built, model=EncoderDecoderModel(built.model.config, seed=0))
    model_config, leaves = given.model.config, jax.tree.leaves(given.model.params)
    values = [np.array(x) for x in leaves]
    monkeypatch.setattr(loop, "build_model", lambda _: given)
    trainer = Trainer(config, log=lambda s: None)
    trainer.run()
    assert given.model.config is model_config and given.model.module.config is model_config
    after = jax.tree.leaves(given.model.params)
    assert len(after) == len(leaves) and all(a is b for a, b in zip(after, leaves))
    assert all(np.array_equal(np.asarray(a), v) for a, v in zip(after, values))
    assert not all(np.array_equal(np.asarray(a), v) for a, v in zip(jax.tree.leaves(trainer.state.params), values))


def test_nan_stops_with_last_good_checkpoint(tmp_path):
    config = RunConfig.from_dict(testing.tiny_run_config(
        str(tmp_path), train={"num_steps": 6}, checkpoint={"every": 2, "keep": 3, "export_final": True}))
    trainer = Trainer(config, log=lambda s: None)
    real_step = trainer.train_step
    calls = []

    def poisoned(state, batch):  # step 5 starts from NaN params, so its loss really is NaN
        calls.append(1)
        if len(calls) == 5:
            state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
        return real_step(state, batch)

    trainer.train_step = poisoned
    with pytest.raises(TrainingDivergedError, match=r"loss is nan .* at step 5: training stopped.* kept checkpoints "
                                                    r".*: step 0 \(start\) [\d.]+, step 2 [\d.]+, step 4 [\d.]+; no "
                                                    r"norm jumps, so step 4 looks sound"):
        trainer.run()
    trainer.checkpoints.close()
    ckpt = os.path.join(trainer.out_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["2", "4"]
    assert not os.path.exists(os.path.join(trainer.out_dir, "final_model"))
    again = Trainer(config, log=lambda s: None)
    assert again.resumed_from == 4
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(again.state.params))
    again.checkpoints.close()


@pytest.mark.parametrize("change, message", [
    ({"train": {"bogus": 1}}, "unknown config key.*train.bogus"),
    ({"mesh": {"data": 3}}, "mesh.*needs 3 devices, but there are 1"),
    ({"mesh": {"data": -1, "model": -1}}, "at most one mesh axis may be -1"),
    ({"train": {"batch_size": 8, "micro_batches": 3}}, "not divisible by train.micro_batches"),
    ({"data": {"train_file": "/nonexistent/train.jsonl"}}, "data.train_file /nonexistent/train.jsonl does not exist"),
    ({"optim": {"learning_rate": "fast"}}, r"optim.learning_rate must be of type float, got 'fast' \(str\)"),
    ({"data": {"format": "parquet"}}, "data.format must be one of"),
    ({"optim": {"freeze": ["^encodr/"]}}, r"optim.freeze: \['\^encodr/'\] match no parameter"),
])
def test_bad_config_fails_before_any_compile(tmp_path, monkeypatch, change, message):
    raw = testing.tiny_run_config(str(tmp_path), **change)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(RunConfigError, match=message):
        Trainer(RunConfig.from_dict(raw))


def test_batch_must_split_over_data_shards(tmp_path):
    raw = testing.tiny_run_config(str(tmp_path), mesh={"data": 4, "fsdp": 2}, train={"batch_size": 12})
    with pytest.raises(RunConfigError, match=r"batch_size 12 is not divisible .* = 8"):
        validate(RunConfig.from_dict(raw), num_devices=8, num_processes=1)
    raw = testing.tiny_run_config(str(tmp_path), mesh={"data": 2, "fsdp": 2, "model": 2}, train={"batch_size": 8})
    assert validate(RunConfig.from_dict(raw), num_devices=8, num_processes=2) == (2, 2, 2)


def test_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(testing.tiny_run_config(str(tmp_path))))
    config = RunConfig.from_json_file(path, ["optim.learning_rate=3e-4", "train.dropout=false",
                                             "data.source_buckets=[8,16]", "output_dir=elsewhere"])
    assert config.optim.learning_rate == 3e-4 and config.train.dropout is False
    assert config.data.source_buckets == (8, 16) and config.output_dir == "elsewhere"
    with pytest.raises(RunConfigError, match="key=value"):
        RunConfig.from_json_file(path, ["optim.learning_rate"])
