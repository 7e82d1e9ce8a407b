#!/usr/bin/env bash
# The test suite as CI runs it (.ci/run calls this): `bash tests/run.sh [pytest options]`; a CPU is enough.
# Installs what is missing first. Without torch and without an NVIDIA GPU it takes torch's CPU build: requirements.txt
# alone would pull the CUDA build (5.7 GB with its libraries) onto a machine that cannot use it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
    python3 -m pip install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
fi
python3 -m pip install -q -r requirements.txt -r tests/requirements.txt
python3 -m pytest -q tests "$@"
