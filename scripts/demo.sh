#!/usr/bin/env bash
# Set up the environment, then segment the bundled phantom CT with the demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/l3muscleseg demo --out "${1:-out/demo}"
