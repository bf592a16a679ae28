#!/usr/bin/env bash
# GPUs, several hosts: the deepspeed launcher reads a hostfile (see launch/hostfile.example) and
# starts ranks over passwordless ssh; the repository and venv must exist at the same path everywhere.
#   HOSTFILE=launch/hostfile.example bash launch/gpu/multinode_deepspeed.sh launch/train.py --deepspeed ...
set -euo pipefail
script=${1:?usage: $0 SCRIPT [ARGS...]}; shift
hostfile=${HOSTFILE:?set HOSTFILE (see launch/hostfile.example)}
master=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$hostfile")}
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
