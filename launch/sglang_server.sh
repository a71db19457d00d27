#!/usr/bin/env bash
# Start one SGLang server for Pixel-Reasoner rollouts (Qwen2.5-VL-7B on one H100/H200; scale with --dp-size).
# Run inside SGLang's own environment: pip install -r requirements-rollout-gpu.txt
# Usage: launch/sglang_server.sh MODEL_DIR [PORT] [DP_SIZE]
# The trainer connects with --config.rollout.backend=sglang --config.rollout.sglang_urls=http://HOST:PORT
set -euo pipefail
MODEL_DIR=${1:?usage: $0 MODEL_DIR [PORT] [DP_SIZE]}
PORT=${2:-30000}
DP=${3:-1}
HOST=${SGLANG_HOST:-127.0.0.1}   # bind to loopback unless told otherwise
# Keep SGLang's id handling token-exact: one pad per image in, expanded on the server (sglang >= 0.5.13).
export SGLANG_MM_AVOID_RETOKENIZE=1
# SGLANG_DETERMINISTIC=1: honour the trainer's per-request sampling seeds (reproducible rollouts, slower).
# SGLang applies sampling_seed only under --enable-deterministic-inference, and a seed with top-p/top-k trips
# an assertion in the flashinfer sampler, hence the pytorch sampling backend. The client reads
# /server_info and sends seeds only to servers started this way (it warns once about the others).
EXTRA=()
if [ "${SGLANG_DETERMINISTIC:-0}" = "1" ]; then
  EXTRA=(--enable-deterministic-inference --sampling-backend pytorch)
fi
exec python -m sglang.launch_server \
  --model-path "$MODEL_DIR" \
  --host "$HOST" --port "$PORT" \
  --tp-size 1 --dp-size "$DP" \
  --dtype bfloat16 \
  --context-length 16384 \
  --mem-fraction-static 0.75 \
  --max-running-requests 256 \
  --chunked-prefill-size 8192 \
  --sampling-defaults openai \
  --weight-version 0 \
  "${EXTRA[@]}"
