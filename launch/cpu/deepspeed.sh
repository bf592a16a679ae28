#!/usr/bin/env bash
# CPU, one host: NPROC ranks (gloo) through the deepspeed launcher.
#   NPROC=2 bash launch/cpu/deepspeed.sh launch/train.py --deepspeed ds_configs/zero2_adamw_pma_fp32.json ...
# The launcher appends --local_rank=N to the script's arguments (pma_dist.distributed.pop_local_rank_arg).
set -euo pipefail
script=${1:?usage: $0 SCRIPT [ARGS...]}; shift
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
