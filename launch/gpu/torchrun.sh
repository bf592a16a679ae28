#!/usr/bin/env bash
# GPUs, one host: one rank per GPU (NCCL) through torchrun.
#   bash launch/gpu/torchrun.sh launch/train.py --deepspeed ds_configs/zero2_adamw_pma_bf16.json ...
set -euo pipefail
script=${1:?usage: $0 SCRIPT [ARGS...]}; shift
ngpu=${NGPU:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --nnodes 1 --nproc_per_node "$ngpu" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  "$script" "$@"
