#!/usr/bin/env bash
# Installs what loom builds with, from Debian's packages. Idempotent: when every
# package is already installed it changes nothing and touches no network.
#   bash scripts/setup.sh            both parts below
#   bash scripts/setup.sh --system   only the Debian packages (what the build needs)
#   bash scripts/setup.sh --python   only the optional Python packages (the interop tests)
set -euo pipefail

part=${1:-all}
case "$part" in
  all|--system|--python) ;;
  *) echo "usage: bash scripts/setup.sh [--system|--python]" >&2; exit 2 ;;
esac

packages=(
  cmake ninja-build g++ pkg-config
  libeigen3-dev libhdf5-dev nlohmann-json3-dev libcli11-dev libpng-dev
  libgtest-dev libgmock-dev libbenchmark-dev
)

install_system() {
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done

  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all build dependencies are installed"
  else
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# Optional: the Python packages of the interop tests (files loom writes, read by the official
# safetensors package and h5py; LoRA files loaded by diffusers itself, which needs torch and peft).
# Without them those tests are not registered; the build says so.
install_python() {
  if command -v python3 >/dev/null 2>&1; then
    if python3 -c "import numpy, safetensors, h5py" 2>/dev/null; then
      echo "setup: numpy, safetensors and h5py are installed (interop tests on)"
    else
      python3 -m pip install --quiet numpy safetensors h5py 2>/dev/null \
        || echo "setup: could not install numpy/safetensors/h5py with pip: the Python interop tests will be skipped"
    fi
    if python3 -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'diffusers', 'peft')))" 2>/dev/null; then
      echo "setup: torch, diffusers and peft are installed (io_diffusers_interop on)"
    else
      python3 -m pip install --quiet torch diffusers peft 2>/dev/null \
        || echo "setup: could not install torch/diffusers/peft with pip: io_diffusers_interop will be skipped"
    fi
  fi
}

[ "$part" = --python ] || install_system
[ "$part" = --system ] || install_python
