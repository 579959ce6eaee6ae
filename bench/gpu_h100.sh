#!/usr/bin/env bash
# The torch trainer's GPU benchmark (issue: ≥ 20k tokens/s bf16 LoRA, ≥ 12k QLoRA at ≤ 10 GiB
# on a Qwen2.5-3B-shaped model), prepared for a short lease of the lent H100.
#
#   bash bench/gpu_h100.sh fetch     here, once: the wheels the GPU image lacks, into .whl/
#   bash bench/gpu_h100.sh bf16      on the GPU (carry .whl): the bf16 attribution matrix
#   bash bench/gpu_h100.sh 4bit      on the GPU (carry .whl): QLoRA, baseline and best
#
# The GPU image has torch, transformers, peft and triton but not bitsandbytes or
# liger-kernel, and cannot download; the project itself installs from this checkout. Each
# variant's result is printed as a JSON line when it finishes (and kept in $OUT), so a run
# cut short still says what it measured (each phase stops itself inside the 10-minute limit
# of one device command). The model is built once in /tmp/qwen-mlx-3b: run both phases on
# the same warm machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == fetch ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2 liger-kernel==0.8.5
    exit
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, triton, bitsandbytes, liger_kernel
print("torch", torch.__version__, "transformers", transformers.__version__, "peft",
      peft.__version__, "triton", triton.__version__, "bitsandbytes", bitsandbytes.__version__)'

common=(--device cuda --shape 3b --seq 4096 --samples 512 --baseline-samples 48
        --model-cache /tmp/qwen-mlx-3b)
case "${1:-}" in
    bf16)  # which gain comes from which change
        timeout 540 python3 bench/train_torch.py "${common[@]}" --quant none --variants \
            plain,ours,ours+bucketed,ours+gc,ours+sel,ours+flex,ours+liger,ours+liger+flex+sel \
            | tee "$out/bench-bf16.txt" ;;  # ours+bucketed: is packed (auto's GPU pick) right?
    4bit)  # ≤ 10 GiB: rows of 4096 need every layer checkpointed (≈ 29 GB of activations
           # otherwise); half the layers fit at rows of 1024
        timeout 400 python3 bench/train_torch.py "${common[@]}" --quant 4bit --variants \
            plain,ours+gc,ours+liger+flex+gc | tee "$out/bench-4bit.txt"
        timeout 140 python3 bench/train_torch.py "${common[@]/4096/1024}" --quant 4bit \
            --variants ours+liger+flex+sel | tee -a "$out/bench-4bit.txt" ;;
    *) echo "usage: bash bench/gpu_h100.sh fetch|bf16|4bit" >&2; exit 2 ;;
esac
