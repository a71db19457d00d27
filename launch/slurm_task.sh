#!/usr/bin/env bash
# One task of launch/slurm_gpu.sbatch, started by srun on each node of a step:
#   slurm_task.sh sglang MODEL_DIR PORT DP   an SGLang server other nodes can reach (launch/sglang_server.sh)
#   slurm_task.sh train COMMAND...            a trainer process, numbered for jax.distributed
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"
[ $# -ge 2 ] || die "usage: $0 sglang MODEL_DIR PORT DP | train COMMAND..."
role=$1
shift
case $role in
  sglang)
    # The trainer reaches this server at the Slurm node name the batch script wrote into its urls, so the
    # server listens on the address that name resolves to here, not on sglang_server.sh's 127.0.0.1.
    # SGLANG_BIND names another address (0.0.0.0: every interface).
    node=${SLURMD_NODENAME:?not inside a Slurm task (SLURMD_NODENAME unset)}
    addr=${SGLANG_BIND:-$(getent hosts "$node" | awk '{print $1; exit}')}
    [ -n "$addr" ] || die "node name $node does not resolve on $(hostname); set SGLANG_BIND to its address"
    case $addr in
      127.* | ::1) die "node name $node resolves to the loopback $addr here, which other nodes cannot reach; set SGLANG_BIND to this node's address" ;;
    esac
    SGLANG_HOST=$addr exec "$HERE/sglang_server.sh" "$@"
    ;;
  train)
    # srun numbers the tasks of a step 0..n-1; main.py reads the process id from JAX_PROCESS_ID.
    export JAX_PROCESS_ID=${SLURM_PROCID:?not inside a Slurm task (SLURM_PROCID unset)}
    # One process drives all GPUs of its node. Without this JAX sees SLURM_LOCALID and gives each process the
    # single GPU of that index (its one-process-per-GPU default under Slurm).
    gpus=${GPUS_PER_NODE:?GPUS_PER_NODE unset}
    JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-$(seq -s, 0 $((gpus - 1)))}
    export JAX_LOCAL_DEVICE_IDS
    exec "$@"
    ;;
  *) die "unknown role '$role': expected sglang or train" ;;
esac
