#!/usr/bin/env bash
# The shmetrics Python package vs prometheus_client's multiprocess mode, in one run and one
# interpreter (BENCHMARKS.md, section (g)): benches/python_package.py prints a markdown table.
#
# Knobs (env): SHMETRICS_BENCH_PYTHON=target/test-venv/bin/python (created like .ci/run if
# missing); INSTALL=1 reinstalls ./python first (release build, as pip builds it); ROUNDS=9,
# TARGET=0.2 (seconds per round), see the .py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SHMETRICS_BENCH_PYTHON:-$PWD/target/test-venv/bin/python}
if [[ ! -x "$PY" ]]; then
    python3 -m venv target/test-venv
    PY=$PWD/target/test-venv/bin/python
fi
if ! "$PY" -c 'import prometheus_client' >/dev/null 2>&1; then
    "$PY" -m pip install -q prometheus_client==0.26.0
fi
if [[ "${INSTALL:-1}" == 1 ]] || ! "$PY" -c 'import shmetrics' >/dev/null 2>&1; then
    "$PY" -m pip install -q ./python
fi
exec "$PY" benches/python_package.py
