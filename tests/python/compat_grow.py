"""One prometheus_client process whose files grow (64 KiB, doubled by the writer while it runs) to
512 KiB and more while the aggregator scrapes; then Python's own view of the directory.

Usage: compat_grow.py DIR OUT  (writes generate_latest(MultiProcessCollector(DIR)) to OUT)
"""
import os
import sys
import time

DIR, OUT = sys.argv[1], sys.argv[2]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = DIR

from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

c = Counter("compat_grow", "Growing.", ["k"], registry=None)
h = Histogram("compat_grow_h", "Growing.", ["k"], registry=None)
for i in range(4000):
    c.labels("key-%05d-%s" % (i, "x" * (i % 50))).inc(i)
    if i % 10 == 0:
        h.labels(str(i)).observe(i / 1000)
    if i % 200 == 0:
        time.sleep(0.02)  # let scrapes see the files at many sizes
sizes = [os.path.getsize(os.path.join(DIR, "%s_%d.db" % (k, os.getpid())))
         for k in ("counter", "histogram")]
assert min(sizes) >= 512 * 1024, "the files did not grow: %r" % sizes
reg = CollectorRegistry()
MultiProcessCollector(reg, path=DIR)
with open(OUT, "wb") as f:
    f.write(generate_latest(reg))
