#!/usr/bin/env bash
# Ours and the anchors side by side, in one command.
#
# Here, once (copies the anchors and the ml_collections wheel into git-ignored folders):
#   bash benchmarks/run_side_by_side.sh --prepare
# On the GPU machine, with the device tool:
#   run(command="bash benchmarks/run_side_by_side.sh", carry=["benchmarks/anchors", "benchmarks/wheels"],
#       timeout_s=600)
# then copy what comes back: files_at/RESULTS.md over benchmarks/RESULTS.md and
# files_at/*.jsonl into benchmarks/results/, and commit them.
# Arguments are passed to `python -m benchmarks.side_by_side` (default: the gpu profile, one
# round, all groups, a 500 s budget; jobs that would start later are skipped and listed), e.g.
# `--groups torch train eval` for a second command if torch_resnet.py did not fit in the first.
# If the call is cut short anyway, files_at/raw_jobs.jsonl holds every finished job's output.
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
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench_site benchmarks/wheels/*.whl
  export PYTHONPATH="/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ ! -f benchmarks/anchors/flax_resnet.py && -d ../shared/anchors ]]; then
  mkdir -p benchmarks/anchors && cp ../shared/anchors/*.py benchmarks/anchors/
fi

if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
"$PYTHON" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

mkdir -p benchmarks/results
marker=$(mktemp)
# 500 s of jobs leaves the device call (600 s at most) time to start, install and copy back.
raw=()
if [[ -n "${OUT:-}" ]]; then raw=(--raw-log "$OUT/raw_jobs.jsonl"); fi
"$PYTHON" -m benchmarks.side_by_side --budget-s 500 "${raw[@]}" "$@" 2>&1
if [[ -n "${OUT:-}" ]]; then
  # The device machine's files come back only from $OUT: the table and the JSON lines this run wrote.
  cp benchmarks/RESULTS.md "$OUT/"
  find benchmarks/results -name '*.jsonl' -newer "$marker" -exec cp {} "$OUT/" \;
fi
