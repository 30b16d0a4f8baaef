"""Test fixtures: a WordPiece vocabulary built from text, tiny BERT / GPT-2 configs, a run config that trains them
on a few aclsum-like pairs in seconds on CPU, and the environment and launch of ``jaxencdec train`` child
processes (one per simulated host)."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from typing import Any

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4

WORDS = ("we propose a new method for neural machine translation and summarization of scientific papers "
         "the model learns to generate short titles from long abstracts using attention over encoder states "
         "results show large gains on benchmark data sets with less training time than previous work").split()


def write_vocab(folder: str, texts: list[str] | None = None, size: int = 200) -> str:
    """Writes ``vocab.txt`` (+ ``tokenizer_config.json``): specials then the ``size`` commonest lowercase words
    of ``texts`` (default: a fixed word list) and single characters, so every text tokenizes without [UNK] storms."""
    os.makedirs(folder, exist_ok=True)
    counts = collections.Counter(w for t in (texts or [" ".join(WORDS)]) for w in re.findall(r"[a-z]+", t.lower()))
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,;:-()'\"%")
    words = [w for w, _ in counts.most_common(size) if w not in chars]
    vocab = SPECIALS + chars + ["##" + c for c in chars[:26]] + words
    # a multiple of 16 rows, so that the vocabulary splits evenly over any test mesh
    vocab += [f"[unused{i}]" for i in range(-len(vocab) % 16)]
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
    return folder


def vocab_size(folder: str) -> int:
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        return sum(1 for _ in f)


def tiny_bert(vocab: int, hidden: int = 32, layers: int = 2, heads: int = 4, dropout: float = 0.1) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of a tiny BERT."""
    return {"model_type": "bert", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": 2 * hidden, "max_position_embeddings": 128,
            "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout, "pad_token_id": 0}


def tiny_gpt2(vocab: int, hidden: int = 32, layers: int = 2, heads: int = 4) -> dict[str, Any]:
    return {"model_type": "gpt2", "vocab_size": vocab, "n_embd": hidden, "n_layer": layers, "n_head": heads,
            "n_positions": 128, "bos_token_id": 3, "eos_token_id": 3}


def tiny_llama(vocab: int, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of a tiny Llama with grouped-query attention."""
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": 2 * hidden,
            "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def write_pairs(path: str, n: int = 24, seed: int = 0) -> str:
    """A JSONL of ``n`` pairs ``{"src", "tgt"}`` whose target is a deterministic function of the source."""
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            src = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))
            tgt = " ".join(src.split()[:4])
            f.write(json.dumps({"src": src, "tgt": tgt}) + "\n")
    return path


def tiny_run_config(folder: str, **sections: dict) -> dict[str, Any]:
    """A run config dict (tiny random bert2bert, jsonl pairs under ``folder``) with sections updated."""
    tok = write_vocab(os.path.join(folder, "tokenizer"))
    train = write_pairs(os.path.join(folder, "train.jsonl"), 24, 0)
    val = write_pairs(os.path.join(folder, "val.jsonl"), 6, 1)
    vocab = vocab_size(tok)
    config = {
        "output_dir": os.path.join(folder, "run"),
        "model": {"encoder_config": tiny_bert(vocab, layers=1), "decoder_config": tiny_bert(vocab, layers=1),
                  "tokenizer": tok,
                  "decoder_start_token_id": 2, "pad_token_id": 0, "eos_token_id": 3},
        "data": {"format": "jsonl", "train_file": train, "eval_file": val, "source_field": "src",
                 "target_field": "tgt", "max_source_length": 24, "max_target_length": 8},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
        "train": {"batch_size": 8, "num_steps": 6, "log_every": 1, "progress_bar": False, "tensorboard": False,
                  "plot": False},
        "mesh": {"data": -1},
        "eval": {"every": -1},
        "checkpoint": {"every": 2, "keep": 2},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


# ---------------------------------------------------------------------- subprocesses with N host devices

# Faster XLA:CPU compiles for tests (the tiny models spend far more time compiling than running): tests/conftest.py
# puts them in XLA_FLAGS before jax is imported, for the test processes and every child they start. XLA:CPU's
# older loop emitters compile in about half the time of its fusion emitters; two different programs computing the
# same values (with and without recorded attentions, say) then differ in float32's last bits rather than being
# bitwise equal, and are compared to 1e-5; the remat and scanned-layer gradients stay within 1e-6 (relative) of
# the unrolled ones. The one check that needs XLA's default emitters for that (``DEFAULT_EMITTERS``, as a user's
# process compiles) asks for them. XLA:CPU's fast-compile preset and one LLVM module per program (no split for
# parallel code generation: the two test processes already keep both cores busy) take another ~20% off the CPU time
# of the per-pair checks (tests/test_llm_decoders.py run alone, twice each way).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false --xla_cpu_opt_preset=FAST_COMPILE "
                      "--xla_cpu_parallel_codegen_split_count=1")
DEFAULT_EMITTERS = {"xla_cpu_use_fusion_emitters": True}  # jax.jit(..., compiler_options=DEFAULT_EMITTERS)


def without_fast_compile_flags(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``FAST_COMPILE_FLAGS`` taken out of its XLA_FLAGS: for a child that must compile what a user's
    process compiles (the demo, TPU programs)."""
    flags = env.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAGS, "").split()
    env = dict(env)
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env


def subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child Python that sees ``devices`` CPU devices (set before it imports jax) and can
    import this module (the tests folder is on its ``PYTHONPATH``); it compiles with conftest's flags and shares the
    run's persistent compilation cache with the other children (the test processes do not use it)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # what a child printed reaches us even when it is killed with SIGKILL
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env.pop("JAX_NUM_PROCESSES", None)
    env.pop("JAX_PROCESS_ID", None)
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_train_workers(config_path, processes: int, env: dict[str, str]) -> list[subprocess.Popen]:
    """Starts ``jaxencdec train config_path`` as ``processes`` jax.distributed processes on this machine (a
    coordinator on a free local port), stdout/stderr piped as text."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "jaxencdec.cli", "train", str(config_path), "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def finish_workers(workers: list[subprocess.Popen], timeout: float = 400) -> list[tuple[str, str]]:
    """Waits for every worker (killing the rest if one overruns ``timeout`` seconds); asserts each exited 0;
    returns their ``(stdout, stderr)``."""
    outputs = []
    try:
        for w in workers:
            outputs.append(w.communicate(timeout=timeout))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    return outputs


def final_params(run_dir: str) -> dict:
    """The exported ``final_model`` params of a finished run, flat (``/``-joined paths) numpy arrays."""
    from flax import traverse_util

    from jaxencdec.checkpoint.formats import read_msgpack

    tree = read_msgpack(os.path.join(run_dir, "final_model", "flax_model.msgpack"))
    return traverse_util.flatten_dict(tree, sep="/")


# ---------------------------------------------------------------------- a Hugging Face cache of configs

# config.json of the hub models the shipped pod configs name (google-bert/bert-base-uncased and bert-large-uncased,
# as published); compiling a run reads nothing else of a model.
BERT_UNCASED = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
                "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
                "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
                "position_embedding_type": "absolute", "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522}
HUB_CONFIGS = {"bert-base-uncased": BERT_UNCASED,
               "bert-large-uncased": {**BERT_UNCASED, "hidden_size": 1024, "intermediate_size": 4096,
                                      "num_attention_heads": 16, "num_hidden_layers": 24}}


def write_hub_cache(folder: str) -> str:
    """A Hugging Face hub cache (``HF_HUB_CACHE``) holding ``HUB_CONFIGS``' config.json files, as
    ``huggingface_hub`` lays out a download (``models--NAME/snapshots/REVISION``, ``refs/main``)."""
    for i, (name, config) in enumerate(HUB_CONFIGS.items()):
        revision = f"{i + 1:040x}"
        snapshot = os.path.join(folder, f"models--{name}", "snapshots", revision)
        os.makedirs(snapshot, exist_ok=True)
        with open(os.path.join(snapshot, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        os.makedirs(os.path.join(folder, f"models--{name}", "refs"), exist_ok=True)
        with open(os.path.join(folder, f"models--{name}", "refs", "main"), "w", encoding="utf-8") as f:
            f.write(revision)
    return folder

