# Shared by bench/gpu.sh and bench/gpu-generators.sh (sourced, not run): a log, steps that each
# get what is left of a time budget and never stop the next, and the wheels a GPU image lacks.
#
# The sourcing script sets tag (its name, the log prefix), logname (the log file's name) and
# budget (seconds), then sources this file with its own arguments (`. bench/gpu-common.sh "$@"`).
# This file sets out (OUT_DIR, the first argument or $OUT, made absolute), repo, wheels
# (${DDFAST_WHEELS:-$repo/.whl}), py (${PYTHON:-python3}), started, logfile and rev (the
# checkout's commit); steps.json lands in $out, and the GPU's name and driver open the log.

out=${1:-${OUT:-}}
if [ -z "$out" ]; then
  echo "usage: bash bench/$tag OUT_DIR" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels=${DDFAST_WHEELS:-$repo/.whl}
py=${PYTHON:-python3}
started=$(date +%s)
logfile=$out/$logname
rev=$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
records=$(mktemp)  # one line per step, joined into steps.json by finish
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$logfile" 2>&1 \
  || : >"$logfile"

log() { echo "[$tag $(date -u +%H:%M:%S)] $*" | tee -a "$logfile"; }

# step NAME CAP_SECONDS DIR COMMAND...: run COMMAND in DIR with min(CAP, budget left) seconds,
# its output appended to the log (or to $step_log, for steps run side by side in the background);
# its exit status and time go to steps.json. DDFAST_GPU_STEPS (comma-separated names) runs only
# the steps it names, and the wheels.
step() {
  local name=$1 cap=$2 dir=$3
  shift 3
  if [ -n "${DDFAST_GPU_STEPS:-}" ] && [ "$name" != wheels ] \
    && [[ ",$DDFAST_GPU_STEPS," != *",$name,"* ]]; then
    log "$name: not asked for (DDFAST_GPU_STEPS=$DDFAST_GPU_STEPS)"
    return 0
  fi
  local left=$((budget - ($(date +%s) - started)))
  local limit=$((cap < left ? cap : left))
  local rc t0
  t0=$(date +%s)
  if [ "$limit" -le 5 ]; then
    log "$name: skipped, the budget is spent"
    rc=124
  else
    log "$name: start (limit ${limit} s)"
    (cd "$dir" && PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" "$@") \
      >>"${step_log:-$logfile}" 2>&1
    rc=$?
    log "$name: exit $rc after $(($(date +%s) - t0)) s"
  fi
  printf '  {"step": "%s", "exit": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" \
    "$(($(date +%s) - t0))" "$limit" >>"$records"
}

# The wheels under $wheels, when there are any, into a private folder put on PYTHONPATH.
install_wheels() {
  if compgen -G "$wheels/*.whl" >/dev/null; then
    local site=/tmp/ddfast-site
    step wheels 120 /tmp "$py" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

# Close steps.json, log the verdict and return the exit status: 0 when every step passed.
finish() {
  local failed=0
  grep -qv '"exit": 0,' "$records" && failed=1
  { echo "["; sed '$!s/$/,/' "$records"; echo "]"; } >"$out/steps.json"
  rm -f "$records"
  log "done in $(($(date +%s) - started)) s; $([ "$failed" = 0 ] && echo 'every step passed' \
    || echo "some step failed: see steps.json and $(basename "$logfile")")"
  return "$failed"
}
