#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), put this checkout and requirements-tpu.txt on every
# worker, and start `python -m pixel_reasoner_jax.main` on all workers at once.
#
# Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE [options] [-- --config.<section>.<key>=VALUE ...]
#   --name, --zone, --project     TPU_NAME, TPU_ZONE, TPU_PROJECT (default: gcloud's configured project)
#   --accelerator-type=v5p-16     TPU_TYPE      } used only when the slice does not exist yet
#   --version=RUNTIME             TPU_RUNTIME   } (RUNTIME: a TPU VM software version, e.g. v2-alpha-tpuv5)
#   --spot                        create a Spot slice
#   --config=FILE[:VARIANT]       CONFIG (default configs/grpo.py:7b)
#   --workdir=DIR                 WORKDIR (required): the run folder, on storage every worker mounts (Filestore
#                                 or NFS, gcsfuse): process 0 writes the assets, all write each checkpoint
#   --git=URL [--ref=REV]         clone URL on every worker instead of copying this checkout (tracked and
#                                 untracked, not ignored files)
#   --python=PY                   TPU_PYTHON (default python3): the workers' Python >= 3.11, makes the venv
#   --remote-dir=DIR              TPU_REMOTE_DIR (default pixel_reasoner_jax, under the home folder): holds
#                                 src/ (the code), .venv/ and logs/
#   --skip-setup                  the code and requirements are in place already: only start the run
#   --attach                      stay connected and stream every worker's output (the run ends with the
#                                 connection); default: the run is detached and this script returns
#   --stop                        stop the run started on every worker, and nothing else
#   --dry-run                     print every command instead of running it
# Each worker logs to <remote-dir>/logs/worker-<N>.log, N its TPU worker number, with its pid in worker-<N>.pid.
# Arguments after -- go to main.py unchanged (quoted for the workers' shell). The processes find each other
# through `--coordinator=auto`: jax.distributed reads the slice's topology from the TPU metadata server.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"
REPO=$(dirname "$HERE")

NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} PROJECT=${TPU_PROJECT:-}
TYPE=${TPU_TYPE:-} RUNTIME=${TPU_RUNTIME:-} SPOT=0
CONFIG=${CONFIG:-configs/grpo.py:7b} WORKDIR=${WORKDIR:-}
GIT_URL="" GIT_REF="" PY=${TPU_PYTHON:-python3} REMOTE=${TPU_REMOTE_DIR:-pixel_reasoner_jax}
SETUP=1 ATTACH=0 STOP=0 DRY_RUN=${DRY_RUN:-0}
while [ $# -gt 0 ]; do
  case $1 in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --accelerator-type=*) TYPE=${1#*=} ;;
    --version=*) RUNTIME=${1#*=} ;;
    --spot) SPOT=1 ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --git=*) GIT_URL=${1#*=} ;;
    --ref=*) GIT_REF=${1#*=} ;;
    --python=*) PY=${1#*=} ;;
    --remote-dir=*) REMOTE=${1#*=} ;;
    --skip-setup) SETUP=0 ;;
    --attach) ATTACH=1 ;;
    --stop) STOP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (options take --key=value; main.py's arguments go after --)" ;;
  esac
  shift
done
OVERRIDES=("$@")
[ -n "$NAME" ] || die "--name (or TPU_NAME) is required"
[ -n "$ZONE" ] || die "--zone (or TPU_ZONE) is required"
if [ "$STOP" = 0 ] && [[ $WORKDIR != /* ]]; then
  # A relative one would land in src/, which the next launch replaces: checkpoints and all.
  die "--workdir (or WORKDIR) must be an absolute path every worker shares, got '$WORKDIR'"
fi
[ -z "$GIT_REF" ] || [ -n "$GIT_URL" ] || die "--ref needs --git=URL"

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[ -z "$PROJECT" ] || WHERE+=(--project="$PROJECT")
R=$(qq "$REMOTE")
# The worker's number in the slice, as jax.distributed reads it: it names the worker's log and pid files.
# shellcheck disable=SC2016  # expands on the worker
WORKER='W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
# Refuses to touch a worker whose earlier run is still going.
GUARD="for f in $R/logs/worker-*.pid; do if [ -e \"\$f\" ] && kill -0 \"\$(cat \"\$f\")\" 2>/dev/null; then echo \"a run is still going (\$f): launch/tpu_pod.sh --stop first\" >&2; exit 1; fi; done"

on_all_workers() {
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

if [ "$STOP" = 1 ]; then
  on_all_workers "for f in $R/logs/worker-*.pid; do [ -e \"\$f\" ] || continue; p=\$(cat \"\$f\"); if kill \"\$p\" 2>/dev/null; then echo \"stopped pid \$p (\$f)\"; fi; rm -f \"\$f\"; done"
  exit 0
fi

# 1. The slice: reuse a READY one of that name, else create it.
DESCRIBE=("${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)')
CREATE=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$RUNTIME")
[ "$SPOT" = 0 ] || CREATE+=(--spot)
if [ "$DRY_RUN" = 1 ]; then
  show "${DESCRIBE[@]}"
  echo "# only when that finds no slice:"
  show "${CREATE[@]}"
elif state=$("${DESCRIBE[@]}" 2>/dev/null); then
  [ "$state" = READY ] || die "TPU $NAME exists in state $state, expected READY (start or delete it)"
  echo "reusing TPU $NAME (READY)"
else
  if [ -z "$TYPE" ] || [ -z "$RUNTIME" ]; then
    die "TPU $NAME not found; creating it needs --accelerator-type and --version"
  fi
  "${CREATE[@]}"
fi

# 2. Code and requirements on every worker, into a fresh src/ (a deleted module must not linger).
if [ "$SETUP" = 1 ]; then
  if [ -n "$GIT_URL" ]; then
    fetch="rm -rf $R/src && git clone --quiet $(qq "$GIT_URL") $R/src"
    [ -z "$GIT_REF" ] || fetch+=" && git -C $R/src checkout --quiet --detach $(qq "$GIT_REF")"
  else
    TARBALL=$(mktemp "${TMPDIR:-/tmp}/pixel_reasoner_jax.XXXXXX")
    trap 'rm -f "$TARBALL"' EXIT
    if [ "$DRY_RUN" = 1 ]; then
      echo "# $TARBALL: this checkout's tracked and untracked, not ignored files (git ls-files)"
    else
      (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
        tar --null -T - -czf "$TARBALL")
    fi
    run "${TPU[@]}" scp "$TARBALL" "$NAME:pixel_reasoner_jax_src.tgz" "${WHERE[@]}" --worker=all
    fetch="rm -rf $R/src && mkdir -p $R/src && tar -xzf pixel_reasoner_jax_src.tgz -C $R/src && rm pixel_reasoner_jax_src.tgz"
  fi
  on_all_workers "set -e; $GUARD; $fetch; cd $R; [ -x .venv/bin/python ] || $(qq "$PY") -m venv .venv; .venv/bin/python -m pip install --quiet --upgrade pip; .venv/bin/python -m pip install --quiet -r src/requirements-tpu.txt -c src/requirements.lock"
fi

# 3. The run, on all workers at once; JAX finds the coordinator and each process id on the slice itself.
# It runs in src/ (config paths are relative to the checkout); the venv and logs sit one level up.
MAIN=(../.venv/bin/python -m pixel_reasoner_jax.main --config="$CONFIG" --workdir="$WORKDIR" --coordinator=auto
  "${OVERRIDES[@]}")
main=$(show "${MAIN[@]}")
# shellcheck disable=SC2016  # expands on the worker
LOG='../logs/worker-$W'
prologue="set -e; $GUARD; cd $R/src; mkdir -p ../logs; $WORKER; rm -f $LOG.failed"
if [ "$ATTACH" = 1 ]; then
  # The workers' login shell may lack pipefail: a failed run leaves a .failed file that sets the exit status.
  on_all_workers "$prologue; { $main || echo \$? > $LOG.failed; } 2>&1 | tee $LOG.log; [ ! -e $LOG.failed ]"
else
  # A run that dies within START_CHECK_S seconds (bad config, missing file) shows its log and fails here.
  wait_s=${TPU_START_CHECK_S:-10}
  on_all_workers "$prologue; nohup setsid $main > $LOG.log 2>&1 < /dev/null & p=\$!; echo \$p > $LOG.pid; sleep $wait_s; if ! kill -0 \$p 2>/dev/null; then tail -n 30 $LOG.log >&2; exit 1; fi; echo \"worker \$W: pid \$p, log $R/logs/worker-\$W.log\""
  [ "$DRY_RUN" = 1 ] || echo "started"
  echo "# follow worker 0's log with:"
  show "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --command="tail -f $R/logs/worker-0.log"
fi
