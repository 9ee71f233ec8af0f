#!/usr/bin/env bash
# Build the local test models (tiny-llama, smollm2-135m-instruct) outside the repository, under
# ${DOCQUEUE_MODEL_DIR:-~/.cache/docqueue/models}. Arguments go to scripts/prepare_models.py:
#   scripts/prepare_models.sh                        # both (skips what is already built)
#   scripts/prepare_models.sh tiny                   # only the tiny random Llama
#   scripts/prepare_models.sh smollm2 --install-deps # pip installs gguf + accelerate if missing
#   scripts/prepare_models.sh --force                # rebuild
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=${PYTHON:-python3}
exec "$PY" scripts/prepare_models.py "$@"
