#!/usr/bin/env bash
# The whole GPU verification of ddfast in one call, inside a fixed time budget.
#
#   bash bench/gpu.sh OUT_DIR            # on a CUDA machine, from the checkout's root
#   DDFAST_GPU_DRY_RUN=1 bash bench/gpu.sh /tmp/gpu-dry   # anywhere: the CUDA parts skip
#
# Steps, most valuable first; each gets what is left of the budget (DDFAST_GPU_BUDGET seconds,
# default 450; give the call about 30 s more) and a failed or timed-out step never stops the next
# (DDFAST_GPU_STEPS=build,tests,check, say, runs only the steps it names, and the wheels):
#   1. install the wheels under ${DDFAST_WHEELS:-.whl} (packages the machine lacks: see
#      bench/gpu-wheels.txt) into a private folder on PYTHONPATH;
#   2. build and install ddfast for sm_90 (CMAKE_CUDA_ARCHITECTURES, default 90), CUDA kernels
#      required;
#   3. pytest tests/test_ops_gpu.py tests/test_train_gpu.py tests/test_eval_gpu.py;
#   4. python -m ddfast.check --no-compile: environment, parity at D 4096 (N 64 and 4096), eager
#      speed, and the end-to-end job under torchrun;
#   4b. bench/profile_eval.py (profile-eval): one DC/DSA evaluation of the study's shape under
#      torch.profiler, its slowest operations on the device and on the host;
#   5. pytest bench/bench_train.py --benchmark-only at batch 64 (the compiled step, CUDA graphs in
#      sampling, each beside the reference path);
#   6. pytest bench/bench_ops.py bench/bench_eval.py --benchmark-only, then bench/summarize.py
#      over both benchmark files.
# The compiled paths are timed once, by the benchmarks (an H200 spends about 90 s compiling the
# step, so the self-check does not compile it again). Each pytest step lists its 25 slowest
# phases, set-up included, so the next budget can be drawn from measurements.
# Everything lands in OUT_DIR (8 files, none nested): gpu.log (every step's output),
# steps.json (exit status and seconds of each step), check.json, profile-eval.json, tests.xml,
# bench-train.json, bench-ops.json and bench.md. Exit status: 0 when every step passed.
set -uo pipefail

tag=gpu.sh
logname=gpu.log
budget=${DDFAST_GPU_BUDGET:-450}
# shellcheck source=bench/gpu-common.sh
. "$(dirname "$0")/gpu-common.sh" "$@"
archs=${CMAKE_CUDA_ARCHITECTURES:-90}
device=cuda
if [ "${DDFAST_GPU_DRY_RUN:-0}" = 1 ]; then
  device=cpu
fi

# Steps run in /tmp, so that the source tree's ddfast, which has no compiled module, never
# shadows the installed one.
log "ddfast GPU verification: $rev, budget ${budget} s, device $device, archs $archs"

# 1. Wheels the machine lacks.
install_wheels

# 2. Build for this GPU, CUDA kernels required (a build without them fails here, not later).
step build 240 /tmp "$py" -m pip install -q --no-deps --no-build-isolation --no-cache-dir \
  -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$archs" -C cmake.define.DDFAST_CUDA=ON "$repo"

# 3. The GPU tests (they skip without a CUDA device).
step tests 150 /tmp "$py" -m pytest -q -p no:cacheprovider --durations=25 --rootdir "$repo" \
  -c "$repo/pyproject.toml" --junitxml "$out/tests.xml" "$repo/tests/test_ops_gpu.py" \
  "$repo/tests/test_train_gpu.py" "$repo/tests/test_eval_gpu.py"

# 4. The self-check at full memory sizes, eagerly.
step check 150 /tmp "$py" -m ddfast.check --device "$device" --no-compile --json "$out/check.json"

# 4b. Where a DC/DSA evaluation's time goes (the study's cell shape, 20 epochs, profiled).
epochs=20
[ "$device" = cpu ] && epochs=1  # a dry run: about 10 s an epoch on one CPU core
step profile-eval 60 /tmp "$py" "$repo/bench/profile_eval.py" --device "$device" \
  --epochs "$epochs" --json "$out/profile-eval.json"

# 5. The job's speed: the compiled fine-tuning step at batch 64 and compiled sampling.
bench() {  # bench NAME CAP JSON FILES... [PYTEST ARGS...]
  local name=$1 cap=$2 json=$3
  shift 3
  step "$name" "$cap" /tmp "$py" -m pytest -q -p no:cacheprovider --durations=25 --rootdir "$repo" \
    -c "$repo/pyproject.toml" --benchmark-only --benchmark-json "$json" "$@"
}
bench bench-train 200 "$out/bench-train.json" "$repo/bench/bench_train.py" \
  --deselect "bench/bench_train.py::test_finetune_ddfast[8]" \
  --deselect "bench/bench_train.py::test_finetune_ref[8]"

# 6. The fused operations and the evaluation, then one table of both benchmark files.
bench bench-ops 200 "$out/bench-ops.json" "$repo/bench/bench_ops.py" "$repo/bench/bench_eval.py"
tables=()
for f in "$out/bench-train.json" "$out/bench-ops.json"; do
  [ -s "$f" ] && tables+=("$f")
done
if [ "${#tables[@]}" -gt 0 ]; then
  step summarize 30 /tmp sh -c "'$py' '$repo/bench/summarize.py' $(printf "'%s' " "${tables[@]}")>'$out/bench.md'"
fi

finish
