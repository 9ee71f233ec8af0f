#!/usr/bin/env bash
# The demo: install, migrate a demo database, start the API in the background, submit the
# example CSVs through the CLI, show the jobs and the chunk messages waiting in Redis, then stop
# what it started. Uses the local PostgreSQL and Redis (or `docker compose up -d postgres redis`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh || {
  echo "demo needs PostgreSQL and Redis on 127.0.0.1; 'docker compose up -d postgres redis' starts both" >&2
  exit 1
}
[ -x .venv/bin/docqueue ] || bash scripts/install.sh

export DOCQUEUE_DATABASE_URL=${DOCQUEUE_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/docqueue_demo}
export DOCQUEUE_REDIS_URL=${DOCQUEUE_REDIS_URL:-redis://127.0.0.1:6379/0}
export DOCQUEUE_API_URL=${DOCQUEUE_API_URL:-http://127.0.0.1:8765}
PORT=${DOCQUEUE_API_URL##*:}
DQ=.venv/bin/docqueue
MODEL=${DOCQUEUE_DEMO_MODEL:-demo-model}

db=${DOCQUEUE_DATABASE_URL##*/}
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE \"$db\""
$DQ db upgrade

LOG=$(mktemp -t docqueue-demo-api.XXXX.log)
$DQ api --port "$PORT" >"$LOG" 2>&1 &
API_PID=$!
trap 'kill $API_PID 2>/dev/null || true; wait $API_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  curl -fsS "$DOCQUEUE_API_URL/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done

DOCQUEUE_API_KEY=$($DQ keys create --tenant demo 2>/dev/null)
export DOCQUEUE_API_KEY

echo "== submit examples/news.csv (summarize) and examples/reviews.csv (classify)"
$DQ submit examples/news.csv --task summarize --model "$MODEL" --id-column id
$DQ submit examples/reviews.csv --task classify --labels positive,negative,neutral \
  --model "$MODEL" --id-column id
echo "== jobs"
$DQ jobs --limit 2
queue=$(.venv/bin/python -c "from service.queue import queue_for_model; print(queue_for_model('$MODEL'))")
echo "== chunk messages waiting on Redis queue $queue: $(redis-cli -h 127.0.0.1 -n "${DOCQUEUE_REDIS_URL##*/}" llen "$queue")"
