#!/usr/bin/env bash
# CPU, one host: NPROC ranks (gloo) through Open MPI's mpirun. The script must call
# pma_dist.distributed.setup_env_from_mpi() before DeepSpeed/torch start (mpi4py finds rank/world;
# MASTER_PORT below is honoured, unlike DeepSpeed's own MPI discovery, which always uses 29500).
#   NPROC=2 bash launch/cpu/mpirun.sh launch/train.py --deepspeed ds_configs/zero2_adamw_pma_fp32.json ...
set -euo pipefail
script=${1:?usage: $0 SCRIPT [ARGS...]}; shift
root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
exec mpirun "${root[@]}" --oversubscribe -np "${NPROC:-2}" --bind-to none \
  -x DS_ACCELERATOR=cpu -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x PYTHONPATH="${PYTHONPATH:-}" -x PATH \
  -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT="${MASTER_PORT:-29500}" \
  "${PYTHON:-python}" "$script" "$@"
