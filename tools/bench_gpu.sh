#!/usr/bin/env bash
# The GPU rows of the README's benchmark tables: both benchmarks on one card, ours beside PyTorch in the same run,
# the three models in float32 and bfloat16. Each step has a timeout; all of them sum to 535 s (one H200).
#   bash tools/bench_gpu.sh [OUTPUT_FOLDER]      (needs jax[cuda], flax, optax, orbax, chex, tokenizers, torch,
#                                                 transformers; run from the repository root)
# Training: batch 64 x (256 + 64), float32 parameters and AdamW state; --dtype bfloat16 computes in bfloat16 (ours)
# and runs PyTorch's forward pass under autocast. Generation: batch 64, 128 source tokens, 64 new tokens, greedy,
# beam-4 and sampling; --dtype bfloat16 holds parameters, compute and cache in bfloat16 on both sides.
# float32 uses each framework's GPU matmul default: JAX uses TF32 there, so PyTorch is told to as well.
# JAX_DEFAULT_MATMUL_PRECISION=highest made XLA's GPU compile of the generate loop run for minutes (jax 0.11.2,
# H100): avoid it.
set -uo pipefail
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
models="$(mktemp -d)"  # the three models: the first run builds them, the others reuse them
trap 'rm -rf "$models"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
quiet() { grep --line-buffered -v "Loading weights\|Writing model shards"; }
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
timeout 30 python3 -c "import jax, flax, torch, transformers; print(jax.devices(), 'jax', jax.__version__, 'flax', \
flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/machine.txt"
generate=(python3 tools/bench_generate.py --device cuda --batch 64 --src-len 128 --new-tokens 64 --repeats 3
          --threads 4 --models-dir "$models")
timeout 160 "${generate[@]}" --dtype float32 --json "$out/generate-float32.json" 2>&1 | quiet \
    | tee "$out/generate-float32.txt"
timeout 130 "${generate[@]}" --dtype bfloat16 --json "$out/generate-bfloat16.json" 2>&1 | quiet \
    | tee "$out/generate-bfloat16.txt"
train=(python3 tools/bench_train.py --device cuda --batch 64 --source 256 --target 64 --steps 10 --warmup 3
       --models-dir "$models" --markdown)
timeout 105 "${train[@]}" --dtype float32 2>&1 | quiet | tee "$out/train-float32.txt"
timeout 100 "${train[@]}" --dtype bfloat16 2>&1 | quiet | tee "$out/train-bfloat16.txt"
