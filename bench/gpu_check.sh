#!/usr/bin/env bash
# The GPU check: every CUDA path CPU tests cannot reach, one line per check, then the four methods'
# throughput on a Llama-3.2-1B-shaped random model. About 10 minutes on one H100/H200.
#   bash bench/gpu_check.sh [--skip-1b] [--only env,qlora,...] [--work DIR]
# Needs ftcli installed with torch (CUDA), transformers, trl, peft, accelerate, datasets, bitsandbytes;
# uses flash-attn, liger-kernel and vllm (GRPO with --vllm colocate) when installed. Installs and downloads nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
exec python bench/gpu_check.py "$@"
