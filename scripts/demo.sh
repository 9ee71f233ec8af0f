#!/usr/bin/env bash
# The demo, end to end on this machine: install, build the local demo model (SmolLM2-135M,
# no model hub), then
#  1. with no server at all: `docqueue run` summarizes examples/news.csv in this process;
#  2. where PostgreSQL and Redis run (or can be started): migrate a demo database, start the
#     API and a worker in the background, summarize examples/news.csv and classify
#     examples/reviews.csv as jobs with progress bars, print the results as tables, then stop
#     what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/docqueue ] || bash scripts/install.sh

export DOCQUEUE_DATABASE_URL=${DOCQUEUE_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/docqueue_demo}
export DOCQUEUE_REDIS_URL=${DOCQUEUE_REDIS_URL:-redis://127.0.0.1:6379/0}
export DOCQUEUE_API_URL=${DOCQUEUE_API_URL:-http://127.0.0.1:8765}
export DOCQUEUE_VLLM_KV_CACHE_GIB=${DOCQUEUE_VLLM_KV_CACHE_GIB:-2}
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
PORT=${DOCQUEUE_API_URL##*:}
DQ=.venv/bin/docqueue

echo "== building the demo model (cached after the first run)"
MODEL=$(.venv/bin/python scripts/prepare_models.py smollm2 2>/dev/null | sed -n 's/^smollm2-135m-instruct: //p')
[ -n "$MODEL" ] || { .venv/bin/python scripts/prepare_models.py smollm2; exit 1; }

echo "== no server: docqueue run examples/news.csv (the engine in this process, state in a file)"
RUN_OUT=$(mktemp -d -t docqueue-run.XXXX)
$DQ run examples/news.csv --task summarize --model "$MODEL" --id-column id \
  --summary-words 25 --max-tokens 48 -o "$RUN_OUT/news.csv" --table

bash scripts/services.sh || {
  echo "PostgreSQL and Redis are not running, so the service part is skipped;" \
    "'docker compose up -d postgres redis' starts both" >&2
  exit 0
}

db=${DOCQUEUE_DATABASE_URL##*/}
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE \"$db\""
$DQ db upgrade

LOGS=$(mktemp -d -t docqueue-demo.XXXX)
setsid $DQ api --port "$PORT" >"$LOGS/api.log" 2>&1 &
API_PID=$!
setsid $DQ worker --model "$MODEL" --gpus all >"$LOGS/worker.log" 2>&1 &
WORKER_PID=$!
cleanup() {
  kill -TERM -- "-$WORKER_PID" "-$API_PID" 2>/dev/null || true
  wait "$WORKER_PID" "$API_PID" 2>/dev/null || true
  echo "stopped the API and the worker (logs: $LOGS)"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  curl -fsS "$DOCQUEUE_API_URL/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
DOCQUEUE_API_KEY=$($DQ keys create --tenant demo 2>/dev/null)
export DOCQUEUE_API_KEY

echo "== waiting for the worker's engine (first start compiles nothing on CPU; ~30 s)"
for _ in $(seq 1 300); do
  curl -fsS -H "Authorization: Bearer $DOCQUEUE_API_KEY" "$DOCQUEUE_API_URL/v1/models" \
    | grep -q "smollm2" && break
  kill -0 "$WORKER_PID" 2>/dev/null || { tail -30 "$LOGS/worker.log"; exit 1; }
  sleep 1
done
$DQ models

echo "== summarize examples/news.csv"
$DQ submit examples/news.csv --task summarize --model "$MODEL" --id-column id \
  --summary-words 25 --max-tokens 48 --wait --poll-s 0.5 | tee "$LOGS/news.txt"
$DQ results "$(awk '/^job /{print $2; exit}' "$LOGS/news.txt")" --table

echo "== classify examples/reviews.csv"
$DQ submit examples/reviews.csv --task classify --labels positive,negative,neutral \
  --model "$MODEL" --id-column id --wait --poll-s 0.5 | tee "$LOGS/reviews.txt"
$DQ results "$(awk '/^job /{print $2; exit}' "$LOGS/reviews.txt")" --table
