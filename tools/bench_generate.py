"""Generation throughput: jaxencdec's jitted generate beside transformers' PyTorch generate, in one run.

    python tools/bench_generate.py                      # the issue's workload: batch 8, 128 source tokens, 64 new
    python tools/bench_generate.py --quick              # a reduced size, to check that it runs
    python tools/bench_generate.py --device cuda --batch 64   # on a GPU: ours (jax[cuda]) and PyTorch on one card

Every (framework, model) pair runs in its own subprocess pinned to the same ``--threads`` CPU cores, so that peak
memory is its own and neither side gets more cores; their calls are interleaved, so that a busy neighbour slows
both alike, and the fastest of ``--repeats`` calls counts. Both sides generate exactly ``--new-tokens`` tokens
(no EOS id, so no row stops early) from the same weights and inputs. Each side first makes one warm-up call: for
ours, its extra time over the fastest call is reported as compile time. tok/s = batch * new tokens / seconds (for
beam search too: the tokens returned, not the hypotheses scored). Peak memory: the process's peak RSS on CPU,
the framework's peak device allocation on a GPU.
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

from bench_common import MODELS, load_line

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


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def worker(args) -> None:
    """Serves one (framework, model) pair: loads it, then answers one JSON request per stdin line.

    Requests: ``{"mode": m}`` -> ``{"seconds": s, "shape": [...]}`` for one generate call; ``{"stats": true}`` ->
    peak memory. The parent interleaves the two frameworks' calls, so that a noisy neighbour slows both alike.
    """
    import numpy as np

    info = json.loads(args.info)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, info["vocab"] - 1, (args.batch, args.src_len))
    if "minilm" in args.model:
        ids[:, 0] = 101  # [CLS]
    mask = np.ones_like(ids)
    common = dict(max_new_tokens=args.new_tokens, eos_token_id=None, **info["tokens"])  # no EOS: no early end
    if args.framework == "torch":
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as XLA does for float32 on a GPU; no effect on the CPU
        model = transformers.EncoderDecoderModel.from_pretrained(args.folder).to(device).eval()
        inputs = dict(input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device))

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

        from jaxencdec import EncoderDecoderModel

        model = EncoderDecoderModel.from_pretrained(args.folder)
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
        else:
            reply = {"peak_rss_mib": _peak_rss_mib(), "device_peak_mib": device_peak()}
        print(json.dumps(reply), flush=True)


class Worker:
    """A worker subprocess and its request/reply pipe."""

    def __init__(self, command):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="batch 2, 32 source tokens, 8 new tokens, 2 repeats")
    parser.add_argument("--json", help="also write the results to this file")
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
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = os.path.join(tmp, model)
            info = _prepare_in_subprocess(model, folder, args.random_minilm)
            workers = {}
            for framework in ("torch", "jax"):
                workers[framework] = Worker([
                    sys.executable, os.path.abspath(__file__), "--worker", "--framework", framework, "--model", model,
                    "--folder", folder, "--info", json.dumps(info), "--batch", str(args.batch),
                    "--src-len", str(args.src_len), "--new-tokens", str(args.new_tokens),
                    "--threads", str(args.threads), "--device", args.device])
            for mode in args.modes:
                first = {f: w.ask({"mode": mode}) for f, w in workers.items()}  # warm-up; ours compiles here
                assert first["torch"]["shape"] == first["jax"]["shape"], first
                times = {f: [] for f in workers}
                for _ in range(args.repeats):  # interleaved, so that both sides see the same machine load
                    for framework, w in workers.items():
                        time.sleep(0.5)  # let the other side's spinning threads go to sleep
                        times[framework].append(w.ask({"mode": mode})["seconds"])
                best = {f: min(t) for f, t in times.items()}  # the least disturbed run
                tokens = args.batch * args.new_tokens
                rows.append({
                    "model": model, "note": info["note"], "params_m": info["params"] / 1e6, "mode": mode,
                    "torch_tok_s": tokens / best["torch"], "ours_tok_s": tokens / best["jax"],
                    "ratio": best["torch"] / best["jax"], "ours_compile_s": first["jax"]["seconds"] - best["jax"],
                    "times": times,
                })
                # Each result as soon as it is known, so that a run cut short still says something.
                last = rows[-1]
                print(f"# {model} {mode}: PyTorch {last['torch_tok_s']:.0f} tok/s, ours {last['ours_tok_s']:.0f} "
                      f"tok/s ({last['ratio']:.2f}x)", file=sys.stderr, flush=True)
            memory = {f: w.ask({"stats": True}) for f, w in workers.items()}
            for w in workers.values():
                w.close()
            for r in rows:
                if r["model"] == model:
                    r["torch_peak_mib"] = memory["torch"]["device_peak_mib"] or memory["torch"]["peak_rss_mib"]
                    r["ours_peak_mib"] = memory["jax"]["device_peak_mib"] or memory["jax"]["peak_rss_mib"]

    memory_kind = "GPU peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"# bench_generate: batch {args.batch}, source {args.src_len} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} CPU threads, device {args.device}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; "
          f"python {platform.python_version()}; {_versions()}")
    print(load_line(load_before))
    print(f"| model | mode | PyTorch tok/s | ours tok/s | ours / PyTorch | ours compile s | "
          f"PyTorch {memory_kind} MiB | ours {memory_kind} MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        note = f", {r['note']}" if r["note"] else ""
        print(f"| {r['model']} ({r['params_m']:.0f}M{note}) | {r['mode']} | {r['torch_tok_s']:.0f} "
              f"| {r['ours_tok_s']:.0f} | {r['ratio']:.2f}x | {r['ours_compile_s']:.1f} "
              f"| {r['torch_peak_mib']:.0f} | {r['ours_peak_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


def _prepare_in_subprocess(model: str, folder: str, random_weights: bool) -> dict:
    """The reference model is built (and its weights saved) in a child, so that this process stays small."""
    code = ("import json, sys; sys.path.insert(0, {!r}); import bench_common as b; "
            "print(json.dumps(b.save_reference_model({!r}, {!r}, {!r})))").format(
                os.path.dirname(os.path.abspath(__file__)), model, folder, random_weights)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"could not prepare {model}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("jax", "flax", "torch", "transformers"))


if __name__ == "__main__":
    sys.exit(main())
