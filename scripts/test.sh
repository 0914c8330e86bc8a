#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Tests start real daemons on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
