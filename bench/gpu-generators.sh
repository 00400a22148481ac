#!/usr/bin/env bash
# Candidate generators of the Fashion-MNIST study, trained from scratch and judged on a GPU in
# one call, their cells brought back to be committed.
#
#   bash bench/gpu-generators.sh OUT_DIR                 # on a CUDA machine, from the checkout's root
#   NAMES=s-gpu bash bench/gpu-generators.sh OUT_DIR     # one candidate
#
# Each candidate (the study scale's `generators` table, default latent-mini-gpu, mini-p2-gpu and
# mini-gpu-long) runs as
#   python -m ddfast.study --dataset fashion-mnist --scale cpu --out results/fashion-mnist \
#       --generators NAME --runs-only
# from the source tree (no build: training from scratch and sampling use no fused op):
# training, samples at the study's chosen setting against the held-out images (with the
# committed full-data classifier), and the IPC-10 set (seed 0) at that setting and at each
# probe setting of the scale. The DC/DSA evaluations are left for the machine the sets go back
# to (`--generators NAME` there evaluates them from the finished runs): on an H200 one took over
# 150 s (DDFAST_GEN_EVALUATE=1 runs them here; DDFAST_GEN_COMPILE=1 adds --compile). A candidate
# that runs out of the budget (DDFAST_GPU_BUDGET seconds, default 420) is killed; its
# pretraining checkpoints stay on the machine, so the same command on a still-held machine
# resumes it.
#
# The name `probes` (in the default list) runs the same command with --probes instead: this
# study's generator sampled at the scale's probe settings. They run side by side, each within
# the whole budget (DDFAST_GEN_PARALLEL=0: one after another); DDFAST_GEN_COMPILE=0 drops
# --compile.
#
# Needs: the wheels of bench/gpu-wheels.txt in ${DDFAST_WHEELS:-.whl}, and Fashion-MNIST's four
# IDX files in ${DDFAST_FMNIST:-.fmnist} (copy them from the Debian package dataset-fashion-mnist;
# git ignores both folders, so carry them). The IDX files are copied to the Debian package's
# folder, where the committed study read them, when that folder lacks them.
#
# OUT_DIR receives generators.tar (every file the runs wrote or changed under the study's folder
# except weights and checkpoints, to unpack in the checkout's root), generators.log and
# steps.json. Unpack, then `python -m ddfast.study ... --report` rebuilds the tables here.
# Other studies: DATASET, SCALE and STUDY_OUT override fashion-mnist, cpu and
# results/fashion-mnist (the tests run the smoke scale on digits, on the CPU).
set -uo pipefail

tag=gpu-generators.sh
logname=generators.log
budget=${DDFAST_GPU_BUDGET:-420}
# shellcheck source=bench/gpu-common.sh
. "$(dirname "$0")/gpu-common.sh" "$@"
dataset=${DATASET:-fashion-mnist}
scale=${SCALE:-cpu}
study=${STUDY_OUT:-results/fashion-mnist}
names=${NAMES:-latent-mini-gpu,mini-p2-gpu,mini-gpu-long}
data=${DDFAST_FMNIST:-$repo/.fmnist}

log "candidate generators $names of $dataset/$scale into $study: $rev, budget ${budget} s"

install_wheels
# The source tree's ddfast alone on the path (python -P: not the working folder either): the
# checkout's root on the path would also offer its top-level kernels/ as the PyPI package
# `kernels`, which transformers (when the machine has it, through diffusers) then fails to
# import. Runs start in the checkout's root, so that their recorded paths are relative to it.
src=$(mktemp -d)
ln -s "$repo/ddfast" "$src/ddfast"
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"

root=()
if [ "$dataset" = fashion-mnist ]; then
  if ! compgen -G "$data/*-idx*" >/dev/null; then
    log "no Fashion-MNIST IDX files in $data: copy them there (see this script's header)"
    exit 2
  fi
  # Where the committed study read them (the Debian package's folder, no --root): a root is a
  # setting of every run, so passing one would make the study's own runs (its generator, which
  # `probes` samples) read as runs of other settings.
  default=$("$py" -P -c 'from ddfast.data.sources import DEFAULT_FASHION_MNIST_ROOT as d; print(d)')
  if compgen -G "$default/*-idx*" >/dev/null \
    || { mkdir -p "$default" 2>/dev/null && cp "$data"/*-idx* "$default"/; }; then
    log "Fashion-MNIST from $default"
  else
    log "cannot write $default: passing --root $data (runs of the committed study will be refused)"
    root=(--root "$data")
  fi
fi

stamp=$(mktemp)
sleep 1  # file times have a resolution of a second on some file systems
compile=()
[ "${DDFAST_GEN_COMPILE:-0}" = 1 ] && compile=(--compile)
evaluate=(--runs-only)
[ "${DDFAST_GEN_EVALUATE:-0}" = 1 ] && evaluate=()
run_one() {  # run_one NAME: a candidate, or `probes` (this study's generator at the probes)
  local what=(--generators "$1")
  [ "$1" = probes ] && what=(--probes)
  step "$1" "$budget" "$repo" "$py" -P -m ddfast.study --dataset "$dataset" --scale "$scale" \
    --out "$study" "${root[@]}" "${what[@]}" "${compile[@]}" "${evaluate[@]}"
}
IFS=',' read -ra list <<<"$names"
if [ "${DDFAST_GEN_PARALLEL:-1}" = 1 ]; then
  # Side by side: one small model leaves most of a large GPU idle. Each writes a folder of its
  # own; each log joins the main one when all are done.
  for name in "${list[@]}"; do
    step_log="$out/$name.log" run_one "$name" &
  done
  wait
  for name in "${list[@]}"; do
    { echo "----- $name"; cat "$out/$name.log"; } >>"$logfile" && rm -f "$out/$name.log"
  done
else
  for name in "${list[@]}"; do
    run_one "$name"
  done
fi

# What the runs wrote, without weights (nor the folders that hold them: a model folder without
# its weights would pass for a trained model), checkpoints or caches: the files to commit.
(cd "$repo" && find "$study" -type f -newer "$stamp" \
  ! -name '*.safetensors' ! -name '*.pt' ! -name '*.pth' ! -name '*.bin' ! -name '*.npz' \
  ! -path '*/checkpoint*' ! -path '*/cache/*' ! -path '*/ckpt/*' ! -path '*/pretrained/*' \
  ! -path '*/model/*' | sort) >"$out/files.txt"
(cd "$repo" && tar -cf "$out/generators.tar" -T "$out/files.txt")
log "packed $(wc -l <"$out/files.txt") files into generators.tar ($(du -h "$out/generators.tar" | cut -f1))"
cat "$out/files.txt" >>"$logfile"
rm -rf "$stamp" "$out/files.txt" "$src"

finish
