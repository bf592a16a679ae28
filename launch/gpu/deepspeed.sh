#!/usr/bin/env bash
# GPUs, one host: one rank per GPU (NCCL) through the deepspeed launcher. NGPU defaults to all visible GPUs.
#   bash launch/gpu/deepspeed.sh launch/train.py --deepspeed ds_configs/zero2_adamw_pma_bf16.json ...
set -euo pipefail
script=${1:?usage: $0 SCRIPT [ARGS...]}; shift
ngpu=${NGPU:-$(nvidia-smi -L | wc -l)}
exec deepspeed --num_gpus "$ngpu" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
