"""A small WSGI application instrumented with the `shmetrics` Python package (python/).

The same shape as app.py with prometheus_client, ported by a change of import. Metrics are
defined at import time: in the master before the fork with gunicorn `preload_app` and uWSGI
without `lazy-apps`, in each worker after it otherwise. The app never serves /metrics: the
aggregator (`shmetrics run`) does, on its own port.

Routes:
    /          200 "ok"
    /pid       200, "<pid> <file>": the worker's pid and the shmetrics file it writes
    /ready     200, declares this worker ready (shmetrics.set_ready(True))
    anything else 404

Metrics, recorded before the response is returned to the server:
    pkg_requests_total{path}   Counter
    pkg_request_seconds{path}  Histogram (with the time() context manager)
    pkg_in_flight              Gauge, multiprocess_mode='livesum' (track_inprogress())
    pkg_up                     Gauge, 'max', set to 1 at import
    pkg_payload_bytes          Summary of the 200 answers' body sizes
    pkg_build                  Info {version="1.2", server=$PKG_SERVER}, set at import
    pkg_state{app}             Enum starting|serving: "serving" once a worker answered /ready
"""

import os

try:
    import shmetrics
except ImportError as e:  # a clear message in the server's log, not only a traceback
    raise ImportError(
        "the shmetrics Python package is not installed in this interpreter: pip install ./python"
    ) from e

from shmetrics import Counter, Enum, Gauge, Histogram, Info, Summary

REQUESTS = Counter("pkg_requests_total", "HTTP requests answered, by route.", ["path"])
LATENCY = Histogram("pkg_request_seconds", "Time spent handling a request, by route.", ["path"])
IN_FLIGHT = Gauge("pkg_in_flight", "Requests being handled.", multiprocess_mode="livesum")
UP = Gauge("pkg_up", "1 once the app is imported.", multiprocess_mode="max")
UP.set(1)
PAYLOAD = Summary("pkg_payload_bytes", "Response sizes.")
BUILD = Info("pkg_build", "The app's build.")
BUILD.info({"version": "1.2", "server": os.environ.get("PKG_SERVER", "?")})
STATE = Enum("pkg_state", "The app's state.", ["app"], states=["starting", "serving"])
STATE.labels("pkg").state("starting")


def route(path):
    """(route label, body) for a request path; None for 404."""
    if path == "/":
        return "/", b"ok\n"
    if path == "/pid":
        return "/pid", b"%d %s\n" % (os.getpid(), str(shmetrics.file_path()).encode())
    if path == "/ready":
        shmetrics.set_ready(True)
        STATE.labels(app="pkg").state("serving")
        return "/ready", b"ready %d\n" % os.getpid()
    return None


def app(environ, start_response):
    path = environ.get("PATH_INFO") or "/"
    with IN_FLIGHT.track_inprogress():
        found = route(path)
        if found is None:
            REQUESTS.labels(path="other").inc()
            status, body = "404 Not Found", b"not found\n"
        else:
            label, body = found
            with LATENCY.labels(label).time():
                REQUESTS.labels(label).inc()
            status = "200 OK"
            PAYLOAD.observe(len(body))
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status, headers)
    return [body]


application = app
