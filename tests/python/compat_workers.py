"""Real prometheus_client 0.26 multiprocess writers, and Python's own view of their files.

Usage: compat_workers.py DIR NWORKERS [BUCKETS]

BUCKETS `exotic` gives compat_latency the bounds 2.5e-05 and 1e7, whose `le` Python formats like Go
(`2.5e-05`, `1e+07`); by default its bounds are plain decimals (0.025 … 100).

The master registers every metric (as a gunicorn master with preload_app does), writes some values
itself, then forks NWORKERS workers. Each worker writes values that depend on its index k (1..N),
then reports ready and blocks until the master tells it to exit (or the master dies). The master
then prints exactly one line:

    READY <master pid> <worker 1 pid> ... <worker N pid>

and serves commands, one per line on stdin, answering each with one line (OK or ERR ...):

    collect OUT                     generate_latest(MultiProcessCollector(DIR)) -> file OUT
    collect_as_dead OUT COPY PID..  copy every *.db of DIR into the fresh directory COPY, call
                                    mark_process_dead(pid, COPY) for each PID, collect COPY -> OUT
    (`collect` writes Prometheus text 0.0.4 to OUT and OpenMetrics 1.0.0 to OUT.om)
    kill I                          SIGKILL worker I (1-based) and reap it
    exit                            let every remaining worker exit (status 0) and reap them
    quit                            end (also on EOF: remaining workers are killed)

Workers are quiescent once READY is printed: nothing writes to DIR afterwards, so a copy of DIR
taken at any later time holds exactly what the files hold.
"""
import os
import sys

DIR = sys.argv[1]
N = int(sys.argv[2])
EXOTIC = len(sys.argv) > 3 and sys.argv[3] == "exotic"
os.environ["PROMETHEUS_MULTIPROC_DIR"] = DIR

import glob  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import (  # noqa: E402
    generate_latest as generate_latest_openmetrics,
)
from prometheus_client.multiprocess import (  # noqa: E402
    MultiProcessCollector,
    mark_process_dead,
)

MODES = [
    "all", "liveall", "min", "livemin", "max", "livemax",
    "sum", "livesum", "mostrecent", "livemostrecent",
]

# Label values and help text with unicode, quotes, backslashes and newlines.
ROUTES = [
    ("/ü/日本", "plain"),
    ("/q", 'say "hi"'),
    ("/b", "back\\slash"),
    ("/n", "new\nline"),
    ("/mix", 'ä"\\\n€ end\\'),
]

requests = Counter(
    "compat_requests", 'Requests: ünïcödé "quoted" back\\slash\nsecond line.',
    ["route", "note"], registry=None,
)
plain = Counter("compat_plain", "A counter without labels.", registry=None)
fbytes = Counter("compat_bytes", "A counter with float increments.", registry=None)
gauges = {
    m: Gauge("compat_g_" + m, "Gauge in mode " + m + ".", ["slot"],
             multiprocess_mode=m, registry=None)
    for m in MODES
}
latency = Histogram(
    "compat_latency", "Custom buckets.", ["route"],
    buckets=[2.5e-05, 0.1, 1, 2.5, 1e7] if EXOTIC else [0.025, 0.1, 1, 2.5, 100], registry=None,
)
default_hist = Histogram("compat_default", "Default buckets.", registry=None)
size = Summary("compat_size", "A summary.", ["kind"], registry=None)

# Series the master creates before forking: every child gets them too, with value 0 (Python resets
# a child's values to its own fresh file on the first use after a fork).
for r, n in ROUTES:
    requests.labels(r, n)
for m in MODES:
    gauges[m].labels("never")  # created, never set: 0 (timestamp 0 for mostrecent modes)
    gauges[m].labels("b")
latency.labels("/shared")

# Master writes before forking.
requests.labels(*ROUTES[0]).inc(100)
plain.inc(3)
fbytes.inc(0.7)
for m in MODES:
    if "mostrecent" not in m:
        gauges[m].labels("b").set(42)
latency.labels("/shared").observe(0.5)
size.labels("master").observe(1)


def worker(k):
    for j, (r, n) in enumerate(ROUTES):
        requests.labels(r, n).inc(k * (j + 1))
    plain.inc(7 * k)
    fbytes.inc(0.1 * k)
    fbytes.inc(0.3)
    for m in MODES:
        g = gauges[m]
        if "mostrecent" in m:
            continue
        g.labels("a").set((-1) ** k * k * 1.5 + 0.25)
        g.labels("w%d" % k).set(k)  # a series only this worker has
        if m in ("sum", "livesum"):
            g.labels("inc").inc(k * 2.5)
            g.labels("inc").dec(0.5)
            g.labels("frac").inc(0.1 * k)
    gauges["max"].labels("inf").set(float("inf") if k == 2 else k)
    gauges["livemax"].labels("inf").set(float("inf") if k == 2 else k)
    gauges["min"].labels("inf").set(float("-inf") if k == 3 else k)
    gauges["all"].labels("nan").set(float("nan") if k == 3 else k)
    gauges["all"].labels("big").set(1.5e300 * k)
    # mostrecent: distinct timestamps (sleep), so there are no ties to break.
    time.sleep(0.02 * k)
    for m in ("mostrecent", "livemostrecent"):
        gauges[m].labels("a").set(10 * k + 0.5)
        gauges[m].labels("w%d" % k).set(k)
    for v in (0.05 * k, 3.0, 2e-05, 5e6 + k, 2e7, 0.1):
        latency.labels("/w").observe(v)
    latency.labels("/shared").observe(0.01 * k)
    for v in (0.003 * k, 0.7, 12, 0.005, 10.0):
        default_hist.observe(v)
    size.labels("req").observe(512 * k)
    size.labels("req").observe(0.25)


workers = []  # [pid, fd of the pipe the worker waits on, alive]
ready_r, ready_w = os.pipe()
for k in range(1, N + 1):
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(ready_r)
            for w in workers:
                os.close(w[1])
            worker(k)
            os.write(ready_w, b"r")
            os.close(ready_w)
            os.read(go_r, 1)  # a byte or EOF (master gone): exit
        finally:
            os._exit(0)
    os.close(go_r)
    workers.append([pid, go_w, True])
os.close(ready_w)
got = 0
while got < N:
    b = os.read(ready_r, N)
    if not b:
        raise SystemExit("a worker died before it was ready")
    got += len(b)

# Master writes after forking (its own file; nothing inherited is counted twice).
requests.labels(*ROUTES[1]).inc(5)
plain.inc(1)
size.labels("master").observe(2.5)
time.sleep(0.02 * (N + 1))
for m in ("mostrecent", "livemostrecent"):
    gauges[m].labels("m").set(-7.25)  # the master's own series, most recent of all

print("READY", os.getpid(), *[w[0] for w in workers], flush=True)


def collect(path, out):
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=path)
    with open(out, "wb") as f:
        f.write(generate_latest(reg))
    with open(out + ".om", "wb") as f:
        f.write(generate_latest_openmetrics(reg))


def reap(w):
    if w[2]:
        os.waitpid(w[0], 0)
        w[2] = False
        os.close(w[1])


for line in sys.stdin:
    args = line.split()
    if not args:
        continue
    cmd = args[0]
    try:
        if cmd == "collect":
            collect(DIR, args[1])
        elif cmd == "collect_as_dead":
            out, copy = args[1], args[2]
            shutil.rmtree(copy, ignore_errors=True)
            os.makedirs(copy)
            for f in glob.glob(os.path.join(DIR, "*.db")):
                shutil.copy(f, copy)
            for pid in args[3:]:
                mark_process_dead(int(pid), copy)
            collect(copy, out)
        elif cmd == "kill":
            w = workers[int(args[1]) - 1]
            os.kill(w[0], signal.SIGKILL)
            reap(w)
        elif cmd == "exit":
            for w in workers:
                if w[2]:
                    os.write(w[1], b"x")
            for w in workers:
                reap(w)
        elif cmd == "quit":
            break
        else:
            raise ValueError("unknown command " + cmd)
        print("OK", flush=True)
    except Exception as e:  # report, keep serving
        print("ERR", repr(e).replace("\n", " "), flush=True)

for w in workers:
    if w[2]:
        os.kill(w[0], signal.SIGKILL)
        reap(w)
