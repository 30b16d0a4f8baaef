#!/usr/bin/env bash
# The GPU rows of the README's benchmark tables: both benchmarks on one card, ours beside PyTorch in the same run.
#   bash tools/bench_gpu.sh [OUTPUT_FOLDER]      (needs jax[cuda], flax, optax, orbax, chex, tokenizers, torch,
#                                                 transformers; run from the repository root)
# float32 parameters on both sides, each framework's GPU matmul default: JAX uses TF32 there, so PyTorch is told
# to as well (bench_generate --device cuda). JAX_DEFAULT_MATMUL_PRECISION=highest made XLA's GPU compile of the
# generate loop run for minutes (jax 0.11.2, H100): avoid it.
set -uo pipefail
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import jax, flax, torch, transformers; print(jax.devices(), 'jax', jax.__version__, 'flax', \
flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/machine.txt"
timeout 330 python3 tools/bench_generate.py --device cuda --batch 64 --repeats 3 --threads 4 \
    --json "$out/generate.json" 2>&1 | grep -v "Loading weights" | tee "$out/generate.txt"
timeout 120 python3 tools/bench_train.py --device cuda --steps 10 --warmup 3 --markdown 2>&1 \
    | grep -v "Loading weights" | tee "$out/train.txt"
timeout 60 python3 tools/bench_train.py --device cuda --steps 10 --warmup 3 --dtype bfloat16 \
    --skip-torch --markdown 2>&1 | grep -v "Loading weights" | tee -a "$out/train.txt"
