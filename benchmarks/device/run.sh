#!/bin/bash
# The measurements of benchmarks/DEVICE.md on a one-GPU host, one process each, results and logs under
# $OUT (default ./device_out); ends with the side-by-side table. LIMIT: seconds for all of them (a run that
# would start with under 50 s left is skipped). ml_collections, if the host lacks it, from wheels in $WHEELS.
#   OUT=/tmp/out bash benchmarks/device/run.sh
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-device_out}; mkdir -p "$OUT"
if ! python3 -c "import ml_collections" 2>/dev/null && [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__, jax.devices())"
START=$(date +%s)
LIMIT=${LIMIT:-540}
DC=benchmarks/device_check.py
PLANS=benchmarks/device/plans
run() {  # name cap args...
  local name=$1 cap=$2; shift 2
  local left=$(( LIMIT - ($(date +%s) - START) ))
  if (( left < 50 )); then echo "== $name skipped ($left s left)"; return; fi
  (( cap > left - 10 )) && cap=$(( left - 10 ))
  echo "== $name (cap $cap s) at $(( $(date +%s) - START )) s"
  timeout "$cap" python3 "$DC" "$@" --out="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "   rc $? after $(( $(date +%s) - START )) s"; grep -v -i "warn" "$OUT/$name.log" | tail -4
}
SFT=(--config.sft.batch_size=2 --config.sft.micro_batches=2 --config.data.max_seq_len=8192 "--config.data.patch_buckets=(4096,)")
GRPO=(--config.rollout.batch_size=64 "--config.data.seq_buckets=(2048,)" --config.rollout.max_total_tokens=2048
      --config.data.max_seq_len=2048 --config.rollout.max_new_tokens=512 "--config.data.patch_buckets=(1024,65536)"
      --config.grpo.train_batch_size=2 --config.grpo.micro_batches=2)
run sft3b_step 170 --what=step --config=configs/sft.py:3b "${SFT[@]}" --plan="$PLANS"/sft_3b_h200-1.json
run grpo7b_decode 170 --what=decode --config=configs/grpo.py:7b "${GRPO[@]}" --plan="$PLANS"/grpo_7b_h200-1.json --repeats=2
run grpo7b_logprobs 130 --what=logprobs --config=configs/grpo.py:7b "${GRPO[@]}" --plan="$PLANS"/grpo_7b_h200-1.json
run grpo3b_decode 120 --what=decode --config=configs/grpo.py:3b "${GRPO[@]}" --plan="$PLANS"/grpo_3b_h200-1.json --repeats=2
run grpo3b_step 150 --what=step --config=configs/grpo.py:3b "${GRPO[@]}" --plan="$PLANS"/grpo_3b_h200-1.json
if compgen -G "$OUT/*.json" > /dev/null; then python3 "$DC" --table "$OUT"/*.json; fi
