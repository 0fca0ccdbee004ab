#!/usr/bin/env bash
# The GPU check in one command (issue 17): the environment, the tests that need a GPU, the bench, the paper-scale
# steps and the rescue on the full Fashion-MNIST, each under a time budget, summarised in OUT/summary.md and .json.
#   bash scripts/gpu_check.sh --out results/gpu/MACHINE                  # one GPU: at most 8 minutes
#   bash scripts/gpu_check.sh --out /tmp/gpu-check --device cpu --tiny   # the dry run on a CPU: under 2 minutes
# The steps live in src/untrainable/bench/gpu_check.py (python -m untrainable.bench.gpu_check --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-python}" -m untrainable.bench.gpu_check --tests "$root/tests" "$@"
