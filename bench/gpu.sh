#!/usr/bin/env bash
# Benchmark items 1, 2, 4, 5 and 9 on a CUDA machine in about 10 minutes (CI never runs this):
#   bash bench/gpu.sh          # from anywhere; runs in the repository root
#   bash bench/gpu.sh decode   # only the items named (here item 9, --decode: under 3 minutes)
# One JSON per item and gpu.log go to $OUT when it is set, else to bench/results/. The project need not
# be pip-installed: the repository root goes on PYTHONPATH. Dependencies the machine lacks can be
# carried as wheels in .whl/, installed here into /tmp/site.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
LOG="$DEST/gpu.log"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
# Per-item limits add up to 10 minutes; the install and each process's start come on top.
declare -A LIMIT=([phase_b_cached]=90 [phase_b_imagenet]=90 [text_truncation]=90 [extract]=150 [decode]=180)
status=0
for name in ${*:-phase_b_cached phase_b_imagenet text_truncation extract decode}; do
  limit=${LIMIT[$name]:?"unknown item $name (one of: ${!LIMIT[*]})"}
  echo "== $name (limit ${limit} s)" | tee -a "$LOG"
  if ! timeout "$limit" "$PY" -m bench --device cuda --only "$name" 2>&1 | tee -a "$LOG"; then
    echo "== $name failed or ran past ${limit} s" | tee -a "$LOG"
    status=1
  fi
done
exit $status
