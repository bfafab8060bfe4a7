#!/usr/bin/env bash
# Set up ssl-course on a fresh machine: offline datasets (Debian packages, when apt exists),
# a virtual environment in .venv, and the package with its development tools.
# Safe to run again: every step is skipped when already done.
# Source it (`. scripts/setup.sh`) to stay inside the environment afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

# 1. Debian packages, when apt exists: the offline data sets (Fashion-MNIST, WordNet glosses, espeak-ng/flite speech
#    synthesis, real recorded digits) and Chromium for the slide-deck browser test. Elsewhere the chapters download
#    what they can (SHA-256 checked) or say what to install.
DEB_PACKAGES="dataset-fashion-mnist wordnet-base espeak-ng flite asterisk-core-sounds-en-wav chromium"
if command -v apt-get >/dev/null 2>&1 && ! dpkg -s $DEB_PACKAGES >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "== installing Debian data packages: $DEB_PACKAGES"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $DEB_PACKAGES; }; then
    echo "warning: could not install $DEB_PACKAGES; chapters that need them will say what to install (Fashion-MNIST is downloaded on first use instead)" >&2
  fi
fi

# 2. Python environment.
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import ssl_course, nbdev, pytest" >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.ssl-course-installed ]; then
  echo "== installing ssl-course and its dependencies (pyproject.toml)"
  python -m pip install -q -e ".[dev]"
  touch .venv/.ssl-course-installed
fi
python -c "import torch, ssl_course; print(f'ssl-course {ssl_course.__version__}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}')"
