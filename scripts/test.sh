#!/usr/bin/env bash
# The test command: lint, type-check, then the whole suite against the local Postgres and Redis.
#   scripts/test.sh                 # everything
#   scripts/test.sh tests/unit -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/docqueue ] || scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
