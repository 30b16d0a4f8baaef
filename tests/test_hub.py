"""Hub ids resolve through huggingface_hub (tested offline against a local hub cache: no machine here reaches
the hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import testing
from hf_reference import batch, hf_encoder_decoder, torch_forward
from jaxencdec import Tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _put_in_hub_cache(cache, repo_id, folder):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_from_pretrained_with_a_hub_id(tmp_path, minilm_path):
    hf = hf_encoder_decoder("bert", "gpt2")
    hf.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "hub"
    _put_in_hub_cache(cache, "acme/tiny-bert2gpt2", tmp_path / "saved")
    _put_in_hub_cache(cache, "acme/minilm", minilm_path)
    ids, mask, labels = batch()
    np.savez(tmp_path / "batch.npz", ids=ids, mask=mask, labels=labels)
    script = f"""
import numpy as np
from jaxencdec import EncoderDecoderModel, Tokenizer
b = np.load({str(tmp_path / 'batch.npz')!r})
model = EncoderDecoderModel.from_pretrained("acme/tiny-bert2gpt2")
np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(model(b["ids"], b["mask"], labels=b["labels"]).logits))
warm = EncoderDecoderModel.from_encoder_decoder_pretrained("acme/minilm", "acme/minilm", decoder_start_token_id=101,
                                                           pad_token_id=0)
print(warm.config.encoder.hidden_size, Tokenizer.from_pretrained("acme/minilm")("hello")["input_ids"].tolist())
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "384 [[101, 7592, 102]]"
    expected, _ = torch_forward(hf, ids, mask, labels)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_a_run_whose_tokenizer_is_a_hub_id_exports_it_with_the_model(tmp_path):
    """``model.tokenizer`` names a hub repo (resolved offline from the cache): ``final_model/`` holds the
    tokenizer the run used, and ``jaxencdec generate`` runs on that folder alone."""
    config = testing.tiny_run_config(str(tmp_path / "data"), train={"num_steps": 2},
                                     checkpoint={"every": 2, "keep": 1})
    cache = tmp_path / "hub"
    _put_in_hub_cache(cache, "acme/tiny-tokenizer", config["model"]["tokenizer"])
    local = Tokenizer.from_pretrained(config["model"]["tokenizer"])
    config["model"]["tokenizer"] = "acme/tiny-tokenizer"
    config["output_dir"] = str(tmp_path / "run")
    (tmp_path / "run.json").write_text(json.dumps(config))
    env = {**testing.subprocess_env(None), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    command = [sys.executable, "-m", "jaxencdec.cli"]
    train = subprocess.run([*command, "train", str(tmp_path / "run.json")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    final = tmp_path / "run" / "final_model"
    assert (final / "tokenizer.json").is_file() and (final / "tokenizer_config.json").is_file()
    text = "the cat sat on the mat"
    assert Tokenizer.from_pretrained(final)(text)["input_ids"].tolist() == local(text)["input_ids"].tolist()
    generate = subprocess.run([*command, "generate", "--model", str(final), "--text", text, "--max-new-tokens", "3"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert generate.returncode == 0, generate.stderr[-3000:]
