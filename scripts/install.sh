#!/usr/bin/env bash
# Install untrainable and everything it needs on a fresh Debian/Ubuntu machine.
# Idempotent: what is already there is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: no apt-get; Fashion-MNIST studies need the files of dataset-fashion-mnist (see README)" >&2
  fi
fi

# The torch pin first, from the index pip is set up with (PyPI on Linux: the CUDA build; a CPU index such as
# https://download.pytorch.org/whl/cpu: the CPU build); a torch already installed is kept (docs/install.md).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
