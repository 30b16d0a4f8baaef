"""Where the time goes: one jaxencdec generate call or train step under the JAX profiler, XLA ops summed by
the model code that emitted them (layer indices folded together), heaviest first.

    python tools/profile_xla.py generate --num-beams 4      # the bench_generate workload, MiniLM bert2bert
    python tools/profile_xla.py train --model bert2gpt2-small   # the bench_train workload
    python tools/profile_xla.py train --top 60 --keep /tmp/trace    # more rows; keep the trace (TensorBoard)

Times are summed over the profiled run and include the profiler's overhead (~25%); compare rows, not totals.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import MODELS, save_reference_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=["generate", "train"])
    p.add_argument("--model", default=MODELS[0], choices=MODELS, help="one of the benchmarks' models")
    p.add_argument("--num-beams", type=int, default=1, help="generate only")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top", type=int, default=30, help="rows to print")
    p.add_argument("--keep", help="keep the trace and the optimized HLO in this folder")
    return p.parse_args(argv)


def generate_call(args, tmp):
    import jax
    import numpy as np

    from jaxencdec import EncoderDecoderModel

    folder = os.path.join(tmp, args.model)
    info = save_reference_model(args.model, folder)
    model = EncoderDecoderModel.from_pretrained(folder)
    ids = np.random.default_rng(0).integers(1000, info["vocab"], (args.batch, 128))
    options = {"max_new_tokens": 64, "eos_token_id": None, "num_beams": args.num_beams, **info["tokens"]}
    return lambda: jax.block_until_ready(model.generate(ids, np.ones_like(ids), **options))


def train_call(args, tmp):
    import bench_train

    folder = os.path.join(tmp, args.model)
    info = save_reference_model(args.model, folder)
    batch = bench_train.make_batch(args.batch, 128, 64, info["vocab"], info["decoder_vocab"],
                                   start_id=info["tokens"]["decoder_start_token_id"])
    return bench_train.jax_step(folder, batch)


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the ``op_name`` metadata (the JAX/Flax call path that emitted it)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text)}


def shorten(op_name: str) -> str:
    op_name = re.sub(r"layers_\d+", "layers_N", op_name)
    return re.sub(r"EncoderDecoderModule\.|\._stack|\._residual|/while/body", "", op_name)


def summarize(trace_dir: str, hlo_dir: str, top: int) -> None:
    from jax.profiler import ProfileData

    names = {}
    for path in glob.glob(os.path.join(hlo_dir, "*after_optimizations.txt")):
        with open(path, encoding="utf-8") as f:
            names.update(op_names(f.read()))
    totals, kinds = collections.Counter(), collections.Counter()
    profile = ProfileData.from_file(max(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)))
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name not in names:  # Python frames, executor and thread-pool events
                    continue
                kind = re.sub(r"\.\d+$", "", event.name)
                totals[(kind, shorten(names[event.name]))] += event.duration_ns
                kinds[kind] += event.duration_ns
    print(f"XLA ops, summed: {sum(kinds.values()) / 1e6:.0f} ms")
    for kind, ns in kinds.most_common(8):
        print(f"  {ns / 1e6:9.1f} ms  {kind}")
    print("by call path:")
    for (kind, path), ns in totals.most_common(top):
        print(f"  {ns / 1e6:9.1f} ms  {kind:<24} {path}")


def main(argv=None):
    args = parse_args(argv)
    keep = args.keep or tempfile.mkdtemp(prefix="jaxencdec-profile-")
    hlo_dir, trace_dir = os.path.join(keep, "hlo"), os.path.join(keep, "trace")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={hlo_dir}".strip()
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        call = (generate_call if args.workload == "generate" else train_call)(args, tmp)
        call()  # compile
        start = time.perf_counter()
        call()
        print(f"one {args.workload} call, unprofiled: {time.perf_counter() - start:.3f} s")
        jax.profiler.start_trace(trace_dir)
        call()
        jax.profiler.stop_trace()
    summarize(trace_dir, hlo_dir, args.top)
    if args.keep:
        print(f"trace and HLO kept in {keep}")


if __name__ == "__main__":
    main()
