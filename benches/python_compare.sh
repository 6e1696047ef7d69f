#!/usr/bin/env bash
# Side by side, in one run: one scrape by shmetrics' aggregator vs. Python prometheus_client's
# MultiProcessCollector + generate_latest, on the *same* prometheus_client multiprocess directories
# (BENCHMARKS.md, section (d)).
#
# For each (W, S) cell, in this order:
#   1. ../shared/anchors/python_multiproc/gen.py writes the directory with W real forked Python
#      workers (S counters, S livesum gauges, S/10 histograms each) and, with --keep-alive, keeps
#      them alive: every measurement below sees live workers (so live gauges are exported by both);
#   2. files and mmap entries are counted (walking the files, untimed); `sync`;
#   3. Python: scrape.py (fresh interpreter; 1 untimed warm-up scrape, then PY_REPEAT timed ones;
#      median and min ms; --check against gen.py's closed forms; last output saved);
#   4. ours: the python_dirs criterion bench (benches/python_dirs.rs) on that directory: first
#      scrape (parses every entry; timed separately, untimed by criterion) and output check, then
#      criterion's point estimate for scrape + encode (from target/criterion/.../new/estimates.json);
#   5. gen.py is SIGTERMed (workers end), the directory removed (KEEP_DIRS=1 keeps it);
#   6. (CHECK=1) both saved outputs are parsed with prometheus_client.parser and compared: families
#      (type, help), sample keys, values (floats within 1e-12 relative).
# and prints one markdown table row. The table is also written to $WORK/table.md.
#
# The bench binary is built once, before the first cell, and copied to $WORK: every cell measures
# the same code even if the working tree changes meanwhile. Running it is equivalent to
#   SHMETRICS_PYDIRS=<dir> cargo bench --bench python_dirs -- --warm-up-time 1 --measurement-time 3
#
# Knobs (env, defaults shown): WORKERS="4 16 64" SERIES="100 1000 10000"
#   SHMETRICS_BENCH_PYTHON=target/test-venv/bin/python (created with prometheus_client==0.26.0
#   like .ci/run if missing)  ANCHOR=../shared/anchors/python_multiproc  WORK=/tmp/shmetrics-pycompare
#   PY_REPEAT=<auto: 10, 5 when W·S > 16,000, 3 when W·S > 160,000>  CRITERION_ARGS="--warm-up-time 1
#   --measurement-time 3"  CHECK=1  KEEP_DIRS=0  GEN_TIMEOUT=300
# Full matrix: about 2.5 minutes on a 2-core VM once the bench is built (the W=64 S=10000 cell:
# ~15 s to generate, ~27 s of Python scrapes, ~8 s of ours).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WORKERS=${WORKERS:-"4 16 64"}
SERIES=${SERIES:-"100 1000 10000"}
PY=${SHMETRICS_BENCH_PYTHON:-$ROOT/target/test-venv/bin/python}
ANCHOR=${ANCHOR:-$ROOT/../shared/anchors/python_multiproc}
WORK=${WORK:-/tmp/shmetrics-pycompare}
CRITERION_ARGS=${CRITERION_ARGS:-"--warm-up-time 1 --measurement-time 3"}
CHECK=${CHECK:-1}
KEEP_DIRS=${KEEP_DIRS:-0}
GEN_TIMEOUT=${GEN_TIMEOUT:-300}

# --- environment ----------------------------------------------------------------------------------
if ! "$PY" -c 'import prometheus_client' >/dev/null 2>&1; then
    if [[ -n "${SHMETRICS_BENCH_PYTHON:-}" ]]; then
        echo "error: $PY cannot import prometheus_client" >&2
        exit 1
    fi
    python3 -m venv "$ROOT/target/test-venv"
    "$ROOT/target/test-venv/bin/pip" install -q prometheus_client==0.26.0
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
mkdir -p "$WORK/harness" "$WORK/dirs" "$WORK/out" "$WORK/logs"
cp "$ANCHOR/gen.py" "$ANCHOR/scrape.py" "$WORK/harness/" # the anchor folder stays untouched
rm -f "$WORK/py.jsonl"

echo "building benches/python_dirs.rs (release) ..." >&2
BIN_SRC=$(cargo bench --bench python_dirs --no-run --message-format=json 2>"$WORK/logs/build" |
    "$PY" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "python_dirs" and m.get("executable"):
        print(m["executable"])') || true
[[ -x "$BIN_SRC" ]] || { tail -20 "$WORK/logs/build" >&2; echo "error: could not build the python_dirs bench" >&2; exit 1; }
BIN="$WORK/python_dirs-bench"
cp "$BIN_SRC" "$BIN"
export CRITERION_HOME="$ROOT/target/criterion"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml benches/python_dirs.rs ||
            echo ' + uncommitted changes in src/, Cargo.toml or the bench')"
    else
        echo "commit: not a git checkout ($ROOT)"
    fi
    echo "python: $("$PY" -c 'import sys, importlib.metadata as m; print(sys.version.split()[0], "prometheus_client", m.version("prometheus_client"))')"
    echo "rustc: $(rustc --version)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
    echo "kernel: $(uname -sr)"
    echo "fs: $(df -T "$WORK" | awk 'NR==2 {print $2}') ($WORK)"
    echo "cells: WORKERS='$WORKERS' SERIES='$SERIES' PY_REPEAT='${PY_REPEAT:-auto}' CRITERION_ARGS='$CRITERION_ARGS'"
} | tee "$WORK/header.txt" >&2

# Noise record: load average every 5 s (it includes this run's own processes).
(while :; do echo "$(date -u +%T) $(cat /proc/loadavg)"; sleep 5; done) >"$WORK/load.log" 2>/dev/null &
LOAD_PID=$!

GEN_PID=
stop_gen() {
    if [[ -n "$GEN_PID" ]]; then
        kill -TERM "$GEN_PID" 2>/dev/null || true
        wait "$GEN_PID" 2>/dev/null || true
        GEN_PID=
    fi
}
cleanup() {
    stop_gen
    kill "$LOAD_PID" 2>/dev/null || true
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# What else is using the CPU right now (top 3 processes by CPU over their lifetime, not ours).
others() {
    ps -eo pid=,pcpu=,etime=,comm= --sort=-pcpu | awk -v me=$$ '$1 != me' | head -3 | tr -s ' ' | paste -sd';'
}

# Counts *.db files and mmap entries by walking every file (independent of the Rust reader).
count_entries() {
    "$PY" - "$1" <<'EOF'
import glob, os, struct, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], '*.db')))
entries = 0
for f in files:
    with open(f, 'rb') as fh:
        data = fh.read()
    used = struct.unpack_from('<i', data, 0)[0]
    pos = 8
    while pos < used:
        n = struct.unpack_from('<i', data, pos)[0]
        pos += 4 + n + (8 - (n + 4) % 8) + 16
        entries += 1
    assert pos == used, f
print(len(files), entries)
EOF
}

# Compares two exposition texts: families (type, help), sample keys and values.
compare_outputs() {
    "$PY" - "$1" "$2" <<'EOF'
import math, sys
from prometheus_client.parser import text_string_to_metric_families

def load(path):
    fams, samples = {}, {}
    with open(path) as f:
        text = f.read()
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith('shmetrics_'):
            continue
        fams[fam.name] = (fam.type, fam.documentation)
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, ('duplicate sample', path, key)
            samples[key] = s.value
    return fams, samples

pf, ps = load(sys.argv[1])
of, os_ = load(sys.argv[2])
errors = []
if pf != of:
    errors.append('families differ: python %r, ours %r' % (pf, of))
only_py, only_ours = ps.keys() - os_.keys(), os_.keys() - ps.keys()
if only_py or only_ours:
    errors.append('%d samples only in Python (e.g. %r), %d only in ours (e.g. %r)' % (
        len(only_py), sorted(only_py)[:2], len(only_ours), sorted(only_ours)[:2]))
exact = close = 0
worst = 0.0
for k in ps.keys() & os_.keys():
    a, b = ps[k], os_[k]
    if a == b:
        exact += 1
    elif math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0):
        close += 1
        worst = max(worst, abs(a - b) / max(abs(a), abs(b)))
    else:
        errors.append('%r: python %r, ours %r' % (k, a, b))
if errors:
    print('DIFFER: ' + '; '.join(errors[:5]))
    sys.exit(1)
print('same (%d families, %d samples: %d identical, %d within 1e-12 relative, at most %.2g apart)' % (
    len(pf), len(ps), exact, close, worst))
EOF
}

ROWS=()
HEADER='| W | S | files | entries | Python median ms | Python min ms | reps | ours ms | ratio (Python median / ours) | our first scrape ms | same samples |'
RULE='|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|'

for W in $WORKERS; do
    for S in $SERIES; do
        name="W${W}_S${S}"
        dir="$WORK/dirs/$name"
        log="$WORK/logs/$name"
        if [[ -n "${PY_REPEAT:-}" ]]; then
            reps=$PY_REPEAT
        elif ((W * S > 160000)); then
            reps=3
        elif ((W * S > 16000)); then
            reps=5
        else
            reps=10
        fi
        echo "== $name: generating ($W live workers) ..." >&2
        rm -rf "$dir"
        "$PY" "$WORK/harness/gen.py" --dir "$dir" --clean --workers "$W" --series "$S" \
            --keep-alive 3600 >"$log.gen" 2>&1 &
        GEN_PID=$!
        for ((t = 0; t < GEN_TIMEOUT * 10; t++)); do
            grep -q '^READY' "$log.gen" && break
            kill -0 "$GEN_PID" 2>/dev/null || break
            sleep 0.1
        done
        grep -q '^READY' "$log.gen" || { echo "error: gen.py did not get ready:" >&2; cat "$log.gen" >&2; exit 1; }
        read -r files entries < <(count_entries "$dir")
        sync
        sleep 1

        echo "== $name: Python, 1 warm-up + $reps timed scrapes (loadavg $(cut -d' ' -f1-4 /proc/loadavg); top: $(others)) ..." >&2
        "$PY" "$WORK/harness/scrape.py" --dir "$dir" --warmup 1 --repeat "$reps" --check --tag "$name" \
            --json "$WORK/py.jsonl" --save-output "$WORK/out/py_$name.prom" | tee "$log.py" >&2
        read -r py_med py_min py_reps py_check < <("$PY" - "$WORK/py.jsonl" "$name" <<'EOF'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if json.loads(l)['tag'] == sys.argv[2]][-1]
print(r['median_ms'], r['min_ms'], r['repeats'], r['check'])
EOF
        )
        [[ "$py_check" == ok ]] || { echo "error: scrape.py --check failed for $name" >&2; exit 1; }

        echo "== $name: ours (loadavg $(cut -d' ' -f1-4 /proc/loadavg); top: $(others)) ..." >&2
        est="$CRITERION_HOME/python_dirs/$name/new/estimates.json"
        rm -f "$est"
        # shellcheck disable=SC2086
        SHMETRICS_PYDIRS="$dir" SHMETRICS_PYDIRS_SAVE="$WORK/out" "$BIN" --bench $CRITERION_ARGS 2>&1 |
            tee "$log.ours" >&2
        ours_ms=$("$PY" -c 'import json, sys
e = json.load(open(sys.argv[1]))
print("%.4g" % ((e["slope"] or e["mean"])["point_estimate"] / 1e6))' "$est")
        first_ms=$(sed -n 's/.*first scrape (parses every entry) \([0-9.]*\) ms.*/\1/p' "$log.ours")
        kill -0 "$GEN_PID" 2>/dev/null || { echo "error: gen.py ended before the measurements did" >&2; exit 1; }
        stop_gen
        [[ "$KEEP_DIRS" == 1 ]] || rm -rf "$dir"

        same=skipped
        if [[ "$CHECK" == 1 ]]; then
            same=$(compare_outputs "$WORK/out/py_$name.prom" "$WORK/out/$name.prom") || true
            echo "== $name: outputs: $same" >&2
            [[ "$same" == same* ]] && same=yes || same=NO
        fi
        ratio=$("$PY" -c 'import sys; print("%.0f×" % (float(sys.argv[1]) / float(sys.argv[2])))' "$py_med" "$ours_ms")
        row=$(printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |' "$W" "$S" "$files" "$entries" \
            "$py_med" "$py_min" "$py_reps" "$ours_ms" "$ratio" "$first_ms" "$same")
        ROWS+=("$row")
        echo "$row" >&2
    done
done

{
    echo "$HEADER"
    echo "$RULE"
    printf '%s\n' "${ROWS[@]}"
} | tee "$WORK/table.md"
awk '{ if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2 }
    END { printf "1-minute load average during the run: %s to %s (%d samples, %s)\n", min, max, NR, FILENAME }' \
    "$WORK/load.log" >&2
