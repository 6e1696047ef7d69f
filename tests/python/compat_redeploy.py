"""A rolling deploy under prometheus_client multiprocess mode: processes of the old code and of the
new code define the same metric names differently (other histogram buckets, an extra label), as
happens when gunicorn replaces workers one by one after a code change (HUP, max_requests).

Usage: compat_redeploy.py DIR OUT

Forks three writers (two "old", one "new") that write fixed values and exit, reaps them, then
writes generate_latest(MultiProcessCollector(DIR)) to OUT. Every metric is a counter, a histogram
or a non-live gauge, so the writers' data stays after they exited.
"""
import os
import sys

DIR, OUT = sys.argv[1], sys.argv[2]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = DIR

from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402


def old_code(k):
    h = Histogram("compat_redeploy_seconds", "Latency.", buckets=[0.1, 1], registry=None)
    c = Counter("compat_redeploy", "Requests.", ["route"], registry=None)
    g = Gauge("compat_redeploy_g", "Per process.", ["slot"], multiprocess_mode="all", registry=None)
    for v in (0.05, 0.3, 0.7, 2.0):
        h.observe(v * k)
    c.labels("/a").inc(k)
    g.labels("x").set(k)


def new_code(k):
    h = Histogram("compat_redeploy_seconds", "Latency.", buckets=[0.1, 0.5, 1, 5], registry=None)
    c = Counter("compat_redeploy", "Requests.", ["route", "method"], registry=None)
    g = Gauge("compat_redeploy_g", "Per process.", ["slot", "zone"], multiprocess_mode="all",
              registry=None)
    for v in (0.05, 0.3, 0.7, 2.0):
        h.observe(v * k)
    c.labels("/a", "GET").inc(10 * k)
    g.labels("x", "eu").set(10 * k)


pids = []
for k, code in ((1, old_code), (2, old_code), (3, new_code)):
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            code(k)
            status = 0
        finally:
            os._exit(status)
    pids.append(pid)
for pid in pids:
    _, status = os.waitpid(pid, 0)
    assert status == 0, "a writer failed"

reg = CollectorRegistry()
MultiProcessCollector(reg, path=DIR)
with open(OUT, "wb") as f:
    f.write(generate_latest(reg))
