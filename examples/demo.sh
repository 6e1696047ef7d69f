#!/usr/bin/env bash
# The main job, on a fresh machine: build shmetrics and the bundled pre-fork HTTP server, run the
# server under `shmetrics run` (4 workers that are recycled every 50 requests, like gunicorn's
# max_requests), send it traffic, and print where to look. Stops on Ctrl-C, or after
# DEMO_SECONDS seconds if that is set.
set -euo pipefail
cd "$(dirname "$0")/.."

APP="${APP:-127.0.0.1:8000}"
METRICS="${METRICS:-127.0.0.1:9180}"
WORKERS="${WORKERS:-4}"

cargo build --release --bin shmetrics --example prefork_server

target/release/shmetrics run --listen "$METRICS" -- \
    target/release/examples/prefork_server --listen "$APP" --workers "$WORKERS" --max-requests 50 &
runner=$!
trap 'kill -TERM "$runner" 2>/dev/null || true; wait "$runner" 2>/dev/null || true' EXIT
trap 'exit 0' INT TERM

# A tiny HTTP GET with bash's /dev/tcp, so the demo needs nothing but bash.
get() { # get HOST:PORT PATH
    local host=${1%:*} port=${1##*:}
    exec 3<>"/dev/tcp/$host/$port" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$2" "$1" >&3
    cat <&3
    exec 3<&-
}

for _ in $(seq 100); do
    get "$APP" / >/dev/null 2>&1 && get "$METRICS" /metrics >/dev/null 2>&1 && break
    sleep 0.1
done

traffic() {
    local paths=(/ / / /pid /slow?ms=20 /status/404 /status/500)
    for i in $(seq "$1"); do get "$APP" "${paths[i % ${#paths[@]}]}" >/dev/null 2>&1 || true; done
}
traffic 300

echo
echo "shmetrics is aggregating $WORKERS pre-fork workers (recycled every 50 requests)."
echo "  application:  http://$APP/"
echo "  metrics:      curl http://$METRICS/metrics"
echo
echo "A few merged series right now (300 requests sent):"
get "$METRICS" /metrics | grep -E '^(http_requests_total|http_requests_in_flight|shmetrics_workers_(live|dead)_total|shmetrics_workers_live) ' || true
get "$METRICS" /metrics | grep -E '^http_requests_total\{' | head -n 5 || true
echo
echo "Sending more traffic every second; Ctrl-C to stop."
start=$SECONDS
while [ -z "${DEMO_SECONDS:-}" ] || [ $((SECONDS - start)) -lt "${DEMO_SECONDS}" ]; do
    traffic 20
    sleep 1
done
