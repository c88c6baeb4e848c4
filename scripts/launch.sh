#!/usr/bin/env bash
# Launch training on one node or several through torchrun (replaces MindFormers' msrun_launcher.sh).
#
#   scripts/launch.sh NPROC_PER_NODE [NNODES NODE_RANK MASTER_ADDR [MASTER_PORT]] -- train.py ARGS...
#
# examples:
#   # 8 devices on this node: data_parallel 2 x model_parallel 4
#   scripts/launch.sh 8 -- train.py --config configs/gpt2/pretrain_gpt2_small.yaml --use_parallel True \
#       parallel.data_parallel=2 parallel.model_parallel=4
#   # the 13B recipe on 4 nodes x 8 devices (run on every node, NODE_RANK 0..3, node 0's address)
#   scripts/launch.sh 8 4 $NODE_RANK 10.0.0.1 29500 -- train.py --config configs/gpt2/pretrain_gpt2_13b.yaml \
#       --use_parallel True
#
# The backend follows the device: hccl on Ascend NPUs, nccl on CUDA GPUs, gloo on CPU.
# accelerate launch works too: scripts/accelerate_npu.yaml is the `accelerate config` of 8 Ascend devices.
set -euo pipefail
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 3 ] || usage
nproc=$1; shift
nnodes=1; node_rank=0; master_addr=127.0.0.1; master_port=29500
if [ "$1" != "--" ]; then
  [ $# -ge 4 ] || usage
  nnodes=$1; node_rank=$2; master_addr=$3; shift 3
  if [ "$1" != "--" ]; then master_port=$1; shift; fi
fi
[ "${1:-}" = "--" ] || usage
shift
cd "$(dirname "$0")/.."
exec python -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "$nnodes" --node_rank "$node_rank" \
  --master_addr "$master_addr" --master_port "$master_port" "$@"
