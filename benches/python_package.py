"""Update costs of the shmetrics Python package vs prometheus_client's multiprocess mode, side by
side in one interpreter (BENCHMARKS.md, section (g)). Run by benches/python_package.sh.

Both libraries export: SHMETRICS_DIR and PROMETHEUS_MULTIPROC_DIR are set to fresh temporary
directories before either is imported, so prometheus_client writes its mmap'd *.db files (its
multiprocess mode: a lock and a dict lookup per update) and shmetrics its own file.

For each case, ROUNDS rounds alternate the two libraries (ours, theirs, ours, ...); a round is one
timeit run of the statement, its iteration count chosen once per library so that a round takes
about TARGET seconds. Reported: the median ns per call over the rounds (timeit's loop overhead
included, the same for both; the empty statement's cost is shown), and theirs / ours.

Knobs (env): ROUNDS=9 TARGET=0.2 (seconds per round).
"""

import os
from importlib import metadata
import platform
import statistics
import sys
import tempfile
import timeit

ROUNDS = int(os.environ.get("ROUNDS", "9"))
TARGET = float(os.environ.get("TARGET", "0.2"))

tmp = tempfile.TemporaryDirectory(prefix="shmetrics-pybench-")
os.makedirs(os.path.join(tmp.name, "shm"))
os.makedirs(os.path.join(tmp.name, "prom"))
os.environ["SHMETRICS_DIR"] = os.path.join(tmp.name, "shm")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(tmp.name, "prom")

import prometheus_client  # noqa: E402
import shmetrics  # noqa: E402

assert shmetrics.file_path(), "shmetrics is not exporting: SHMETRICS_DIR unusable"


def make(lib):
    return {
        "counter": lib.Counter("bench_requests", "Requests."),
        "family": lib.Counter("bench_labelled", "Requests by method and status.", ["method", "status"]),
        "gauge": lib.Gauge("bench_in_flight", "In flight.", multiprocess_mode="livesum"),
        "histogram": lib.Histogram("bench_seconds", "Latency."),
    }


OURS = make(shmetrics)
THEIRS = make(prometheus_client)

CASES = [
    ("Counter.inc()", "m['counter'].inc()"),
    ("Counter.labels('GET', '200').inc()", "m['family'].labels('GET', '200').inc()"),
    ("Gauge.inc()", "m['gauge'].inc()"),
    ("Gauge.set(3.0)", "m['gauge'].set(3.0)"),
    ("Histogram.observe(0.3) (default buckets)", "m['histogram'].observe(0.3)"),
]


def per_call(stmt, m, number):
    t = timeit.Timer(stmt, globals={"m": m})
    return t.timeit(number) / number * 1e9


def iterations(stmt, m):
    t = timeit.Timer(stmt, globals={"m": m})
    n, _ = t.autorange()  # at least 0.2 s
    per = t.timeit(n) / n
    return max(1000, int(TARGET / per))


print(f"python {platform.python_version()} ({sys.executable}), prometheus_client "
      f"{metadata.version('prometheus_client')}, shmetrics {metadata.version('shmetrics')}, "
      f"rounds {ROUNDS}, ~{TARGET} s per round")
empty = statistics.median(per_call("pass", {}, 10_000_000) for _ in range(3))
print(f"empty statement: {empty:.1f} ns\n")
print("| call | shmetrics ns | prometheus_client (multiprocess) ns | ratio |")
print("|---|---:|---:|---:|")
for name, stmt in CASES:
    n_ours, n_theirs = iterations(stmt, OURS), iterations(stmt, THEIRS)
    ours, theirs = [], []
    for _ in range(ROUNDS):
        ours.append(per_call(stmt, OURS, n_ours))
        theirs.append(per_call(stmt, THEIRS, n_theirs))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"| `{name}` | {o:.0f} | {t:.0f} | {t / o:.1f}× |", flush=True)
