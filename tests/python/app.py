"""A small WSGI application instrumented with prometheus_client, as a real one would be.

Standard library and prometheus_client only. It knows nothing about shmetrics, gunicorn or
uWSGI: the metrics are defined at import time, and prometheus_client itself switches to its
multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set in the environment (`shmetrics run`
exports it). So the same file runs unchanged

- alone (`python app.py [PORT]`, one process, in-memory metrics),
- under gunicorn with or without `preload_app`,
- under uWSGI with or without `lazy-apps`,

and never serves /metrics itself: the aggregator does, on its own port.

Routes:
    /             200 "ok"
    /pid          200, the worker's pid (tests use it to find and kill workers)
    /status/NNN   answers with status NNN (100 <= NNN <= 599)
    /crash        the worker kills itself (SIGKILL) in the middle of the request, which gets no
                  answer: it is counted in app_in_flight and nowhere else
    anything else 404

Metrics, recorded before the response is returned to the server:
    app_requests_total{method,path,status}   Counter
    app_request_seconds{path}                Histogram
    app_in_flight                            Gauge, multiprocess_mode='livesum'

`path` is the route's template (`/status/{code}`, `other` for unknown paths), as a real app
labels by route and not by raw URL to keep the number of series bounded.
"""

import os
import signal
import time

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "app_requests_total",
    "HTTP requests answered, by method, route and status.",
    ["method", "path", "status"],
)
LATENCY = Histogram(
    "app_request_seconds",
    "Time spent handling a request, by route.",
    ["path"],
)
# 'livesum': the sum over live processes. A worker that dies in the middle of a request (see
# /crash) leaves 1 in its file; it must stop counting once the worker is dead.
IN_FLIGHT = Gauge(
    "app_in_flight",
    "Requests being handled.",
    multiprocess_mode="livesum",
)

REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    418: "I'm a teapot",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def route(path):
    """(route label, status, body) for a request path."""
    if path == "/":
        return "/", 200, b"ok\n"
    if path == "/pid":
        return "/pid", 200, b"%d\n" % os.getpid()
    if path.startswith("/status/"):
        code = path[len("/status/"):]
        if code.isdigit() and 100 <= int(code) <= 599:
            return "/status/{code}", int(code), b"status %s\n" % code.encode()
    return "other", 404, b"not found\n"


def app(environ, start_response):
    start = time.perf_counter()
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO") or "/"
    IN_FLIGHT.inc()
    try:
        if path == "/crash":
            # Dies with the request in flight and unanswered, as a segfault or the OOM killer
            # would: no Python clean-up, no atexit, no server hook.
            os.kill(os.getpid(), signal.SIGKILL)
        label, status, body = route(path)
        REQUESTS.labels(method, label, str(status)).inc()
        LATENCY.labels(label).observe(time.perf_counter() - start)
    finally:
        IN_FLIGHT.dec()
    reason = REASONS.get(status, "Unknown")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(f"{status} {reason}", headers)
    return [body]


# uWSGI's default callable name is `application`.
application = app


if __name__ == "__main__":
    import sys
    from wsgiref.simple_server import make_server

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    with make_server("127.0.0.1", port, app) as httpd:
        print(f"serving on http://127.0.0.1:{port}/", flush=True)
        httpd.serve_forever()
