#!/usr/bin/env bash
# Ours and the anchors side by side.
#
# Here, once (copies the anchors and the ml_collections and tensorboardX wheels into
# git-ignored folders):
#   bash benchmarks/run_side_by_side.sh --prepare
# On the GPU machine a lease is 15 minutes of device time in all (the machine's start, a
# minute or more, included), so the run comes in stages, one device call each, the one that
# decides the issue's targets first (`STAGES` in benchmarks/side_by_side.py):
#   run(command="bash benchmarks/run_side_by_side.sh --stage targets",
#       carry=["benchmarks/anchors", "benchmarks/wheels"], timeout_s=480)
#   run(command="bash benchmarks/run_side_by_side.sh --stage rest", carry=[...the same], timeout_s=270)
#   run(command="bash benchmarks/run_side_by_side.sh --stage torch", ..., timeout_s=210)  # if time is left
# each at once after the last (the machine stays warm 30 s). A call's figures come back in
# files_at/<date>_<device>.jsonl (that call's alone): append it to the file of that name in
# benchmarks/results/, then make one table of the stages:
# `python -m benchmarks.report benchmarks/results/<date>_<device>.jsonl --runs <calls>`
# (the calls that wrote a file: one that measured nothing writes none and exits 1).
# files_at/raw_jobs.log holds every finished job's output, also of a call cut short. A job
# skipped at its stage's budget: `--cases NAME ... --torch off --budget-s <what is left>`.
# Other arguments go to `python -m benchmarks.side_by_side` (without --stage: every group,
# a 500 s budget).
# On the 2-core CPU machine:
#   bash benchmarks/run_side_by_side.sh --profile cpu --rounds 3 --budget-s 3600 \
#     --device '2-core CPU (CI-class machine)'
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p benchmarks/anchors benchmarks/wheels
  cp ../shared/anchors/flax_resnet.py ../shared/anchors/torch_resnet.py ../shared/anchors/jpeg_pipeline.py \
    benchmarks/anchors/
  # The GPU machine has jax, flax, optax, orbax, absl, PyYAML, protobuf and pillow but neither
  # ml_collections (configs and resnet_flax.optim import it) nor tensorboardX (train.py's
  # metrics writer: the train_loop case), and no network: carry their pure-Python wheels.
  "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: -d benchmarks/wheels 'ml_collections==1.1.0' \
    'tensorboardX==2.6.5'
  ls benchmarks/anchors benchmarks/wheels
  exit 0
fi

PYTHON="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${OUT:-}" ]]; then PYTHON=.venv/bin/python; fi
if ! "$PYTHON" -c 'import ml_collections, tensorboardX' 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/bench_site benchmarks/wheels/*.whl
  export PYTHONPATH="/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ ! -f benchmarks/anchors/flax_resnet.py && -d ../shared/anchors ]]; then
  mkdir -p benchmarks/anchors && cp ../shared/anchors/*.py benchmarks/anchors/
fi

if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
"$PYTHON" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

# The device machine's files come back only from $OUT: there, this call's figures (a file of
# their own, so no earlier call's lines come back twice), its table and every job's output.
out_args=()
if [[ -n "${OUT:-}" ]]; then
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  out_args=(--results-dir "$OUT" --results-md "$OUT/RESULTS.md" --raw-log "$OUT/raw_jobs.log")
fi
"$PYTHON" -m benchmarks.side_by_side "${out_args[@]}" "$@" 2>&1
