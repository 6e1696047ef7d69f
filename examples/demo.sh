#!/usr/bin/env bash
# The main job, on a fresh machine: build shmetrics and the bundled pre-fork HTTP server, run the
# server under `shmetrics run` (4 workers that are recycled every 50 requests, like gunicorn's
# max_requests), send it traffic, and print where to look. Stops on Ctrl-C, or after
# DEMO_SECONDS seconds if that is set.
#
# Anything that goes wrong (the build, the application or the metrics port not answering,
# `shmetrics run` exiting) ends the script with a message on stderr and a non-zero status.
#
# Settings (environment):
#   APP, METRICS, WORKERS   the application's and the metrics' addresses, the worker count
#   DEMO_SECONDS            stop after this many seconds (default: run until Ctrl-C)
#   PROFILE                 the cargo profile to build and run (default: release)
#   DEMO_BUILD=0            do not build: use what is already in the cargo target directory
#   SHMETRICS_BIN, SERVER_BIN   use these two binaries instead (no build)
# The binaries are found in cargo's target directory (CARGO_TARGET_DIR and .cargo/config are
# honoured: the directory comes from `cargo metadata`).
set -euo pipefail
cd "$(dirname "$0")/.."

APP="${APP:-127.0.0.1:8000}"
METRICS="${METRICS:-127.0.0.1:9180}"
WORKERS="${WORKERS:-4}"
PROFILE="${PROFILE:-release}"

die() {
    echo "demo.sh: error: $*" >&2
    exit 1
}

if [ -n "${SHMETRICS_BIN:-}" ] || [ -n "${SERVER_BIN:-}" ]; then
    [ -n "${SHMETRICS_BIN:-}" ] && [ -n "${SERVER_BIN:-}" ] \
        || die "set both SHMETRICS_BIN and SERVER_BIN (or neither, to build them)"
    shmetrics=$SHMETRICS_BIN
    server=$SERVER_BIN
else
    if [ "${DEMO_BUILD:-1}" != 0 ]; then
        cargo build --profile "$PROFILE" --bin shmetrics --example prefork_server \
            || die "cargo build --profile $PROFILE failed (see cargo's messages above)"
    fi
    metadata=$(cargo metadata --format-version 1 --no-deps) || die "cargo metadata failed"
    target_dir=$(printf '%s' "$metadata" | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    [ -n "$target_dir" ] || die "cannot find cargo's target directory in the output of cargo metadata"
    case "$PROFILE" in
        dev | test) profile_dir=debug ;;
        bench) profile_dir=release ;;
        *) profile_dir=$PROFILE ;;
    esac
    shmetrics=$target_dir/$profile_dir/shmetrics
    server=$target_dir/$profile_dir/examples/prefork_server
fi
for bin in "$shmetrics" "$server"; do
    [ -f "$bin" ] && [ -x "$bin" ] || die "$bin is not an executable file (not built? without DEMO_BUILD=0 this script builds it)"
done

"$shmetrics" run --listen "$METRICS" -- \
    "$server" --listen "$APP" --workers "$WORKERS" --max-requests 50 &
runner=$!
trap 'kill -TERM "$runner" 2>/dev/null || true; wait "$runner" 2>/dev/null || true' EXIT
trap 'exit 0' INT TERM

# A tiny HTTP GET with bash's /dev/tcp, so the demo needs nothing but bash. It fails if nothing
# listens, or if no byte comes for 5 s (a port held by something that never answers).
get() { # get HOST:PORT PATH
    local host=${1%:*} port=${1##*:} line status
    exec 3<>"/dev/tcp/$host/$port" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$2" "$1" >&3
    while :; do
        status=0
        IFS= read -r -t 5 line <&3 || status=$?
        if [ "$status" -gt 128 ]; then # timed out
            exec 3<&-
            return 1
        fi
        if [ "$status" != 0 ]; then # end of the response; its last line may have no newline
            printf '%s' "$line"
            break
        fi
        printf '%s\n' "$line"
    done
    exec 3<&-
}

# Fails the demo if `shmetrics run` has exited.
alive() { # alive WHEN
    if ! kill -0 "$runner" 2>/dev/null; then
        local status=0
        wait "$runner" || status=$?
        trap - EXIT
        die "shmetrics run exited with status $status $1 (see its messages above)"
    fi
}

app_up=0 metrics_up=0
for _ in $(seq 100); do
    alive "before the application answered"
    # grep reads everything (no -q): with pipefail, an early exit would fail the pipeline.
    [ "$app_up" = 1 ] || { get "$APP" / 2>/dev/null | grep '^HTTP/1.1 200' >/dev/null && app_up=1; } || true
    [ "$metrics_up" = 1 ] || { get "$METRICS" /metrics 2>/dev/null | grep '^HTTP/1.1 200' >/dev/null && metrics_up=1; } || true
    [ "$app_up$metrics_up" = 11 ] && break
    sleep 0.1
done
[ "$app_up" = 1 ] || die "the application did not answer on http://$APP/ within 10 s"
[ "$metrics_up" = 1 ] || die "the metrics port did not answer on http://$METRICS/metrics within 10 s"

traffic() {
    local paths=(/ / / /pid /slow?ms=20 /status/404 /status/500)
    for i in $(seq "$1"); do get "$APP" "${paths[i % ${#paths[@]}]}" >/dev/null 2>&1 || true; done
    alive "while the demo was sending traffic"
}
traffic 300

metrics=$(get "$METRICS" /metrics) || die "the metrics port stopped answering on http://$METRICS/metrics"
echo
echo "shmetrics is aggregating $WORKERS pre-fork workers (recycled every 50 requests)."
echo "  application:  http://$APP/"
echo "  metrics:      curl http://$METRICS/metrics"
echo
echo "A few merged series right now (301 requests: the start-up check and 300 more):"
grep -E '^(http_requests_in_flight|shmetrics_workers_(live|dead_total)) ' <<<"$metrics" || true
grep -E '^http_requests_total\{' <<<"$metrics" | head -n 5 || true
echo
echo "Sending more traffic every second; Ctrl-C to stop."
start=$SECONDS
while [ -z "${DEMO_SECONDS:-}" ] || [ $((SECONDS - start)) -lt "${DEMO_SECONDS}" ]; do
    traffic 20
    sleep 1
done

# A clean stop: SIGTERM through `shmetrics run`, which must exit 0 with the server.
trap - EXIT
kill -TERM "$runner"
status=0
wait "$runner" || status=$?
[ "$status" = 0 ] || die "shmetrics run exited with status $status when stopped"
