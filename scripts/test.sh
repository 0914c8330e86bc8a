#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Tests start real daemons on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The suite starts hundreds of Python processes (daemons, CLI commands): let them compile the project's
# modules once, where an environment that sets PYTHONDONTWRITEBYTECODE would recompile them in each.
unset PYTHONDONTWRITEBYTECODE
python -m pytest -q "$@"
