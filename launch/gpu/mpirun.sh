#!/usr/bin/env bash
# GPUs through mpirun, one or more hosts: HOSTS="node1:8,node2:8" (default: this host, all GPUs).
# Rank 0's address reaches the others through mpi4py (pma_dist.distributed.setup_env_from_mpi).
#   HOSTS=node1:8,node2:8 bash launch/gpu/mpirun.sh launch/train.py --deepspeed ds_configs/zero3_adamw_pma_bf16.json ...
set -euo pipefail
script=${1:?usage: $0 SCRIPT [ARGS...]}; shift
ngpu=$(nvidia-smi -L | wc -l)
hosts=${HOSTS:-localhost:$ngpu}
np=0; IFS=, read -ra entries <<<"$hosts"; for e in "${entries[@]}"; do np=$((np + ${e##*:})); done
exec mpirun -np "$np" -H "$hosts" --bind-to none --map-by slot \
  -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" -x PYTHONPATH="${PYTHONPATH:-}" -x PATH -x LD_LIBRARY_PATH \
  -x MASTER_PORT="${MASTER_PORT:-29500}" -x NCCL_DEBUG="${NCCL_DEBUG:-WARN}" \
  "${PYTHON:-python}" "$script" "$@"
