"""The shmetrics package's API, exercised in one process and three forked children
(tests/it/python_package.rs checks the merged exposition exactly).

Asserts what can be checked in-process (exceptions, cached children) and exits 0, printing
`ok <file_path()>`. Works with and without SHMETRICS_DIR (then file_path() is None).
"""

import os
import sys
import time

import shmetrics
from shmetrics import Counter, Enum, Gauge, Histogram, Info, Summary


def raises(exc, f, *args, **kw):
    try:
        f(*args, **kw)
    except exc as e:
        return str(e)
    raise AssertionError(f"{f} {args} {kw} did not raise {exc.__name__}")


REQ = Counter("api_requests_total", "Requests.", ["method", "code"])
REQ.labels("GET", 200).inc()
REQ.labels(method="GET", code="200").inc(2.5)
assert REQ.labels("GET", "200") is REQ.labels(method="GET", code=200), "children are cached"
# The same definition again is the same metric.
Counter("api_requests_total", "Requests.", ["method", "code"]).labels("GET", "200").inc()

assert "missing label values" in raises(ValueError, REQ.inc)
raises(ValueError, REQ.labels, "GET")
assert "both" in raises(ValueError, REQ.labels, "GET", code="200")
raises(ValueError, REQ.labels, method="GET", status="200")
raises(ValueError, REQ.labels("GET", "200").inc, -1)
raises(ValueError, Counter, "1bad", "x")
raises(ValueError, Counter, "api_requests", "Another help.")  # a conflicting definition
raises(ValueError, Gauge, "api_g", "x", multiprocess_mode="bogus")
raises(ValueError, Histogram, "api_h", "x", buckets=[2, 1])
raises(ValueError, Histogram, "api_h", "x", ["le"])
raises(ValueError, Counter, "api_s", "x", "method")  # a str, not a sequence of label names
raises(ValueError, Counter("api_plain", "Unlabelled.").labels, "a")
raises(NotImplementedError, REQ.clear)
raises(NotImplementedError, Gauge("api_fn", "x").set_function, time.time)

SENT = Counter("sent_total", "Namespaced.", namespace="ns", subsystem="sub", unit="bytes")
SENT.inc(3)
assert repr(SENT) == "shmetrics.Counter(ns_sub_sent_bytes)", repr(SENT)

EXC = Counter("api_exceptions", "Exceptions.")
for e in (ValueError, KeyError):
    try:
        with EXC.count_exceptions(ValueError):
            raise e
    except (ValueError, KeyError):
        pass


@EXC.count_exceptions()
def boom():
    raise RuntimeError


try:
    boom()
except RuntimeError:
    pass

PROGRESS = Gauge("api_in_progress", "In progress.", multiprocess_mode="sum")
with PROGRESS.track_inprogress():
    pass

CLOCK = Gauge("api_clock", "Last time.", multiprocess_mode="mostrecent")
CLOCK.set_to_current_time()

LAT = Histogram("api_latency_seconds", "Latency.", buckets=[0.1, 1, float("inf")])
for v in (0.05, 0.5, 5):
    LAT.observe(v)

TIMED = Histogram("api_timed_seconds", "Timed.", ["kind"])


@TIMED.labels("decorated").time()
def work():
    return 7


assert [work() for _ in range(3)] == [7, 7, 7]
with TIMED.labels(kind="block").time():
    pass

SIZES = Summary("api_sizes", "Sizes.", ["kind"])
SIZES.labels("a").observe(2)
SIZES.labels("a").observe(3.5)
with Summary("api_summary_timed_seconds", "Timed.").time():
    pass
raises(ValueError, Enum, "api_noStates", "x")
raises(ValueError, Enum, "api_mode", "x", ["api_mode"], states=["a"])
raises(ValueError, Enum("api_e", "x", states=["a"]).state, "b")
raises(ValueError, Info, "api_i", "x", unit="u")
raises(ValueError, Info("api_i2", "x", ["k"]).labels("v").info, {"k": "1"})
MODE = Enum("api_mode", "Mode.", states=["idle", "busy", "down"])
MODE.state("busy")
Info("api_build", "Build.").info({"version": "1.2", "rev": 7})

# Forked children (os.fork holds the GIL across the fork): each gets a file of its own, registers
# a metric after the fork, and exits normally (the clean-exit flag).
FORKED = Counter("api_forked", "Increments in forked children.", ["who"])
children = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        assert shmetrics.file_path() is None or f"w-{os.getpid()}-" in shmetrics.file_path()
        for _ in range(100):
            FORKED.labels("child").inc()
        Counter("api_after_fork", "Registered in a child after the fork.").inc()
        sys.exit(0)
    children.append(pid)
for pid in children:
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"child {pid}: status {status}"
FORKED.labels("parent").inc()

print("ok", shmetrics.file_path(), flush=True)
