#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh virtual environment, and run
# `untrainable list` and one tiny `untrainable train` from it, with a shipped config read from the installed
# package. A config or data file missing from the wheel fails here. Run by .ci/run.
#
# The environment sees the system's packages (torch is not downloaded again), but untrainable itself must be
# the wheel's: the check fails if it is imported from anywhere else (an editable install, src/, PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --no-isolation: build with the setuptools already installed rather than fetching one.
python -m build --wheel --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  cat "$work/build.log" >&2
  exit 1
}
wheel="$(ls "$work"/dist/untrainable-*.whl)"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"

cd "$work"  # away from the checkout, so nothing is imported from src/
venv_python="$work/venv/bin/python"
"$venv_python" - "$work/venv" <<'EOF'
import sys
from pathlib import Path

import untrainable

where = Path(untrainable.__file__).resolve()
if Path(sys.argv[1]).resolve() not in where.parents:
    sys.exit(f"error: untrainable was imported from {where}, not from the wheel installed in {sys.argv[1]}")
missing = [name for name in ("py.typed", "configs/mnist1d.toml") if not (where.parent / name).is_file()]
if missing:
    sys.exit(f"error: the wheel lacks {', '.join(missing)} (package-data in pyproject.toml)")
print(f"untrainable from the wheel: {where}")
EOF
"$work/venv/bin/untrainable" list >"$work/list.txt"
grep -q "rescue" "$work/list.txt" || {
  cat "$work/list.txt" >&2
  echo "error: untrainable list from the wheel does not list the rescue experiment" >&2
  exit 1
}
config="$("$venv_python" -c 'from importlib.resources import files; print(files("untrainable") / "configs" / "mnist1d.toml")')"
"$work/venv/bin/untrainable" train --config "$config" --out "$work/run" \
  --set model.args.depth=2 --set model.args.width=32 --set data.args.num_samples=600 --set data.args.val_size=100 \
  --set train.max_steps=5 --set train.progress=false >"$work/train.log" 2>&1 || {
  cat "$work/train.log" >&2
  exit 1
}
for file in config.json metrics.jsonl model.pt; do
  [ -s "$work/run/$file" ] || {
    echo "error: the tiny run from the wheel wrote no $file in $work/run" >&2
    exit 1
  }
done
echo "package check passed: wheel $(basename "$wheel") installed, listed, trained"
