"""Job-wide Prometheus metrics for pre-fork Python servers.

A prometheus_client-shaped API over the shmetrics writer: each process writes its metrics into a
fixed-layout mmap'd file in ``$SHMETRICS_DIR``; one aggregator (``shmetrics run`` / ``serve``)
merges the files and serves ``/metrics``. Without ``SHMETRICS_DIR`` the metrics live in private
memory (nothing is exported, nothing fails), as prometheus_client works without
``PROMETHEUS_MULTIPROC_DIR``.

Porting from prometheus_client is a change of import::

    from shmetrics import Counter, Enum, Gauge, Histogram, Info, Summary

Forking after creating metrics just works (gunicorn ``preload_app``, uWSGI without
``lazy-apps``): each forked process gets a file of its own.
"""

from ._native import (
    DEFAULT_BUCKETS,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    degraded,
    file_path,
    set_ready,
)

__all__ = [
    "Counter",
    "Gauge",
    "Histogram",
    "Summary",
    "Info",
    "Enum",
    "DEFAULT_BUCKETS",
    "set_ready",
    "file_path",
    "degraded",
]
