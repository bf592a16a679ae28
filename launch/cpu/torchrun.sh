#!/usr/bin/env bash
# CPU, one host: NPROC ranks (gloo) through torchrun.
#   NPROC=2 bash launch/cpu/torchrun.sh launch/train.py --deepspeed ds_configs/zero2_adamw_pma_fp32.json ...
set -euo pipefail
script=${1:?usage: $0 SCRIPT [ARGS...]}; shift
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes 1 --nproc_per_node "${NPROC:-2}" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  "$script" "$@"
