"""Generation throughput: jaxencdec's jitted generate beside transformers' PyTorch generate, in one run, and how
close a decoding step comes to the device's measured copy bandwidth.

    python tools/bench_generate.py                      # the default workload: batch 8, 128 source tokens, 64 new
    python tools/bench_generate.py --quick              # a reduced size, to check that it runs
    python tools/bench_generate.py --device cuda --batch 64   # on a GPU: ours (jax[cuda]) and PyTorch on one card
    python tools/bench_generate.py --dtype bfloat16     # bfloat16 parameters, compute and cache on both sides

Every (framework, model) pair runs in its own subprocess pinned to the same ``--threads`` CPU cores, so that peak
memory is its own and neither side gets more cores; their calls are interleaved, so that a busy neighbour slows
both alike, and the fastest of ``--repeats`` calls counts. Both sides generate exactly ``--new-tokens`` tokens
(no EOS id, so no row stops early) from the same weights and inputs. Each side first makes one warm-up call: for
ours, its extra time over the fastest call is reported as compile time. tok/s = batch * new tokens / seconds (for
beam search too: the tokens returned, not the hypotheses scored). Peak memory: the process's peak RSS on CPU,
the framework's peak device allocation on a GPU.

bert2llama-small, bert2qwen2-small and bert2gemma3-small pair a Llama-family decoder, which transformers cannot
hold in an ``EncoderDecoderModel``: their PyTorch side is the causal LM alone, generating from the start token (no
encoder, no cross-attention: less work than ours does).

A decoding step reads the decoder's weights and caches once; ``step_bytes`` counts those bytes, and a step's time
is a call's seconds / new tokens (the call includes the encoder pass, once, so this slightly overstates a step).
The fraction of copy bandwidth = bytes per step / seconds per step / ``copy_bandwidth`` (an in-place jitted
``x + 1`` over 1 GiB of float32, read + write) on the same device, measured once per run in ours' first worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from bench_common import DEFAULT_MODELS, MODELS, best_call_seconds, load_line

MODES = {
    "greedy": {},
    "beam-4": {"num_beams": 4},
    "sampling": {"do_sample": True},  # transformers' defaults: top_k=50, temperature 1
}


def _pin(threads: int) -> None:
    """Before torch / jax start their thread pools: use ``threads`` cores."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    # XLA's CPU thread pool sizes itself from the affinity mask.


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_bytes(info: dict, batch: int, beams: int, src_len: int, new_tokens: int, itemsize: int) -> float:
    """Bytes one decoding step reads at least, averaged over the ``new_tokens`` steps of a call; ``info`` from
    bench_common.save_reference_model (L decoder layers of hidden size h), ``itemsize`` bytes a value:

        parameters          (decoder_params - L (2 h^2 + 2 h)) x itemsize: every decoder parameter, the tied LM head
                            and word embedding once, less the cross-attention key/value projections (applied to the
                            source once per call, not per step)
        self-attention      rows x L x w x itemsize x (new_tokens + 1) / 2, rows = batch x beams: step i attends to
                            i positions (the start token and the tokens generated before it); w the width of a
                            position's keys and values, 2 h (fewer with grouped-query attention)
        cross-attention     batch x L x 2 h x src_len x itemsize: the source's keys and values, one copy per input
                            (its beams share them)

    A floor: a cache read at its full length, or source keys/values copied per beam, is more.
    """
    layers, hidden = info["decoder_layers"], info["decoder_hidden"]
    params = info["decoder_params"] - layers * (2 * hidden**2 + 2 * hidden)
    self_attention = batch * beams * layers * info.get("decoder_kv_width", 2 * hidden) * (new_tokens + 1) / 2
    cross_attention = batch * layers * 2 * hidden * src_len
    return (params + self_attention + cross_attention) * itemsize


def copy_bandwidth() -> float:
    """The default JAX device's copy bandwidth, bytes/s: a jitted ``x + 1`` over a 1 GiB float32 array, in place
    (the input donated), counted as 2 GiB (read and write), best of 5 timings (10 calls a timing on a GPU) after a
    warm-up call. In place, because a fresh 1 GiB output on the CPU is page faults first (~10x slower); ``x + 0``
    would be simplified to no work at all."""
    import jax
    import jax.numpy as jnp

    add_one = jax.jit(lambda x: x + 1, donate_argnums=0)
    box = {"x": jnp.zeros((2**28,), jnp.float32)}

    def call():
        box["x"] = add_one(box["x"])
        return box["x"]

    cpu = jax.devices()[0].platform == "cpu"
    return 2 * box["x"].nbytes / best_call_seconds(call, calls=1 if cpu else 10)


def worker(args) -> None:
    """Serves one (framework, model) pair: loads it, then answers one JSON request per stdin line.

    Requests: ``{"mode": m}`` -> ``{"seconds": s, "shape": [...]}`` for one generate call; ``{"stats": true}`` ->
    peak memory; ``{"bandwidth": true}`` (ours) -> the device's copy bandwidth. The parent interleaves the two
    frameworks' calls, so that a noisy neighbour slows both alike.
    """
    import numpy as np

    info = json.loads(args.info)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, info["vocab"] - 1, (args.batch, args.src_len))
    if info["tokens"]["decoder_start_token_id"] == 101:  # a BERT decoder starts at [CLS]: so does a BERT input
        ids[:, 0] = 101
    mask = np.ones_like(ids)
    common = dict(max_new_tokens=args.new_tokens, eos_token_id=None, **info["tokens"])  # no EOS: no early end
    if args.framework == "torch":
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as XLA does for float32 on a GPU; no effect on the CPU
        if info.get("pytorch") == "causal-lm":  # a pair transformers cannot hold: its LLM alone, from the start token
            model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "llm"))
            start = torch.full((args.batch, 1), info["tokens"]["decoder_start_token_id"], device=device)
            inputs = dict(input_ids=start, attention_mask=torch.ones_like(start))
        else:
            model = transformers.EncoderDecoderModel.from_pretrained(args.folder)
            inputs = dict(input_ids=torch.tensor(ids, device=device),
                          attention_mask=torch.tensor(mask, device=device))
        model.to(device=device, dtype=getattr(torch, args.dtype)).eval()

        def call(mode):
            with torch.no_grad():
                out = model.generate(**inputs, **common, **MODES[mode])
            if device.type == "cuda":
                torch.cuda.synchronize()
            return list(out.shape)

        def device_peak():
            return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    else:
        import jax
        import jax.numpy as jnp

        from jaxencdec import EncoderDecoderModel

        dtype = jnp.dtype(args.dtype)
        model = EncoderDecoderModel.from_pretrained(args.folder, dtype=dtype, param_dtype=dtype)
        key = jax.random.key(0)

        def call(mode):
            return list(jax.block_until_ready(model.generate(ids, mask, prng_key=key, **common, **MODES[mode])).shape)

        def device_peak():
            stats = jax.devices()[0].memory_stats() if args.device != "cpu" else None
            return stats["peak_bytes_in_use"] / 2**20 if stats else None

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "mode" in request:
            start = time.perf_counter()
            shape = call(request["mode"])
            reply = {"seconds": time.perf_counter() - start, "shape": shape}
        elif "bandwidth" in request:
            reply = {"bytes_per_s": copy_bandwidth()}
        else:
            reply = {"peak_rss_mib": _peak_rss_mib(), "device_peak_mib": device_peak()}
        print(json.dumps(reply), flush=True)


class Worker:
    """A worker subprocess and its request/reply pipe; ``wait_ready`` once it has loaded its model."""

    def __init__(self, command):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker {self.process.args[3:7]} died (see its stderr above)")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="both sides: parameters, compute and cache (ours: dtype and param_dtype)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 32 source tokens, 8 new tokens, 2 repeats")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--models-dir", help="save the models here, or reuse those an earlier run saved (default: "
                                             "a temporary folder)")
    parser.add_argument("--random-minilm", action="store_true",
                        help="MiniLM's shape with random weights (the default where the asset is not installed)")
    # Internal: one (framework, model) measurement in a subprocess.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.src_len, args.new_tokens, args.repeats = 2, 32, 8, 2

    if args.worker:
        _pin(args.threads)
        if args.framework == "jax" and args.device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        if args.device == "cuda":  # both frameworks share the card: JAX must not take 75% of it up front
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        worker(args)
        return 0

    load_before = os.getloadavg()[0]
    rows = []
    bandwidth = None
    itemsize = {"float32": 4, "bfloat16": 2}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder, info = _prepare_in_subprocess(model, args.models_dir or tmp, args.random_minilm)
            workers = {}
            for framework in ("torch", "jax"):  # both load at once
                workers[framework] = Worker([
                    sys.executable, os.path.abspath(__file__), "--worker", "--framework", framework, "--model", model,
                    "--folder", folder, "--info", json.dumps(info), "--batch", str(args.batch),
                    "--src-len", str(args.src_len), "--new-tokens", str(args.new_tokens),
                    "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype])
            for w in workers.values():
                w.wait_ready()
            for mode in args.modes:
                first = {f: w.ask({"mode": mode}) for f, w in workers.items()}  # warm-up; ours compiles here
                assert first["torch"]["shape"] == first["jax"]["shape"], first
                times = {f: [] for f in workers}
                for _ in range(args.repeats):  # interleaved, so that both sides see the same machine load
                    for framework, w in workers.items():
                        if args.device == "cpu":
                            time.sleep(0.5)  # let the other side's spinning threads go to sleep
                        times[framework].append(w.ask({"mode": mode})["seconds"])
                best = {f: min(t) for f, t in times.items()}  # the least disturbed run
                tokens = args.batch * args.new_tokens
                rows.append({
                    "model": model, "note": info["note"], "params_m": info["params"] / 1e6, "mode": mode,
                    "torch_tok_s": tokens / best["torch"], "ours_tok_s": tokens / best["jax"],
                    "ratio": best["torch"] / best["jax"], "ours_compile_s": first["jax"]["seconds"] - best["jax"],
                    "step_bytes": step_bytes(info, args.batch, MODES[mode].get("num_beams", 1), args.src_len,
                                             args.new_tokens, itemsize),
                    "torch_step_s": best["torch"] / args.new_tokens, "ours_step_s": best["jax"] / args.new_tokens,
                    "times": times,
                })
                # Each result as soon as it is known, so that a run cut short still says something.
                last = rows[-1]
                print(f"# {model} {mode}: PyTorch {last['torch_tok_s']:.0f} tok/s, ours {last['ours_tok_s']:.0f} "
                      f"tok/s ({last['ratio']:.2f}x)", file=sys.stderr, flush=True)
            memory = {f: w.ask({"stats": True}) for f, w in workers.items()}
            if bandwidth is None:  # once, after ours' peak memory was read
                bandwidth = workers["jax"].ask({"bandwidth": True})["bytes_per_s"]
            for w in workers.values():
                w.close()
            for r in rows:
                if r["model"] == model:
                    r["torch_peak_mib"] = memory["torch"]["device_peak_mib"] or memory["torch"]["peak_rss_mib"]
                    r["ours_peak_mib"] = memory["jax"]["device_peak_mib"] or memory["jax"]["peak_rss_mib"]

    for r in rows:
        for side in ("torch", "ours"):
            r[f"{side}_bandwidth_pct"] = 100 * r["step_bytes"] / r[f"{side}_step_s"] / bandwidth
    memory_kind = "GPU peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"# bench_generate: batch {args.batch}, source {args.src_len} tokens, {args.new_tokens} new tokens, "
          f"{args.dtype}, {args.threads} CPU threads, device {args.device}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; "
          f"python {platform.python_version()}; {_versions()}")
    print(f"# copy bandwidth measured: {bandwidth / 1e9:.1f} GB/s (jitted in-place x + 1 over a 1 GiB float32 "
          "array, read and write)")
    print(load_line(load_before))
    print(f"| model | mode | PyTorch tok/s | ours tok/s | ours / PyTorch | ours compile s | "
          f"PyTorch {memory_kind} MiB | ours {memory_kind} MiB | MB read / step | PyTorch ms / step "
          "| ours ms / step | PyTorch % of copy bandwidth | ours % of copy bandwidth |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        note = f", {r['note']}" if r["note"] else ""
        print(f"| {r['model']} ({r['params_m']:.0f}M{note}) | {r['mode']} | {r['torch_tok_s']:.0f} "
              f"| {r['ours_tok_s']:.0f} | {r['ratio']:.2f}x | {r['ours_compile_s']:.1f} "
              f"| {r['torch_peak_mib']:.0f} | {r['ours_peak_mib']:.0f} | {r['step_bytes'] / 1e6:.0f} "
              f"| {_ms(r['torch_step_s'])} | {_ms(r['ours_step_s'])} | {r['torch_bandwidth_pct']:.1f} "
              f"| {r['ours_bandwidth_pct']:.1f} |")
    step = {(r["model"], r["mode"]): r for r in rows}
    both = [m for m in args.models if (m, "sampling") in step and (m, "greedy") in step]
    if both:
        print("\n| model | PyTorch sampling / greedy step time | ours sampling / greedy step time |")
        print("| --- | ---: | ---: |")
        for m in both:
            sampling, greedy = step[m, "sampling"], step[m, "greedy"]
            print(f"| {m} | {sampling['torch_step_s'] / greedy['torch_step_s']:.2f} "
                  f"| {sampling['ours_step_s'] / greedy['ours_step_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "copy_bandwidth_bytes_s": bandwidth, "rows": rows}, f, indent=1)
    return 0


def _prepare_in_subprocess(model: str, models_dir: str, random_weights: bool) -> tuple[str, dict]:
    """The reference model is built (and its weights saved) in a child, so that this process stays small."""
    code = ("import json, sys; sys.path.insert(0, {!r}); import bench_common as b; "
            "print(json.dumps(b.reference_model({!r}, {!r}, {!r})))").format(
                os.path.dirname(os.path.abspath(__file__)), model, models_dir, random_weights)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"could not prepare {model}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ms(seconds: float) -> str:
    """Milliseconds, three significant digits below 100 (a GPU's step is a fraction of one)."""
    return f"{1e3 * seconds:.3g}" if seconds < 0.1 else f"{1e3 * seconds:.0f}"


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("jax", "flax", "torch", "transformers"))


if __name__ == "__main__":
    sys.exit(main())
