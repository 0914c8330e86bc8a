#!/usr/bin/env bash
# Set up (if needed) and run the main job on an embedded default: `dllmctl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
dllmctl init >/dev/null
dllmctl demo "$@"
