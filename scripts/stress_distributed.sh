#!/usr/bin/env bash
# The distributed tests (gloo process groups in spawned processes) run N times while busy loops load every core:
# a rank that aborts at exit under load (a backend thread outliving its group) shows here as a failed run.
#   bash scripts/stress_distributed.sh [N=20] [LOG_FOLDER=runs/stress-distributed]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
logs=${2:-runs/stress-distributed}
mkdir -p "$logs"
busy=()
for _ in $(seq 1 "$(nproc)"); do
  python -c "while True: pass" &
  busy+=($!)
done
trap 'kill "${busy[@]}" 2>/dev/null || true' EXIT
passed=0
failed=0
for i in $(seq 1 "$runs"); do
  if python -m pytest -q -p no:cacheprovider -n 2 tests/test_adaptive_alpha.py tests/test_distributed.py \
    >"$logs/run$i.log" 2>&1; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
  fi
  echo "run $i: $(tail -1 "$logs/run$i.log"); load $(cut -d' ' -f1 /proc/loadavg)"
done
echo "$passed of $runs runs passed, $failed failed; logs in $logs/"
[ "$failed" = 0 ]
