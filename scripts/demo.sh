#!/usr/bin/env bash
# Set up (if needed) and run the main job: compress the embedded SmolLM2-135M by 20 % of its blocks and report.
# Extra arguments go to `flatten compress` (e.g. --overwrite, --out DIR, --scorer NAME; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flatten compress smollm2-135m --fraction 0.2 "$@"
