#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded SmolLM2-135M. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m flatten.demo "$@"
