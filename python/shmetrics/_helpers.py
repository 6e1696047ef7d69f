"""Decorators and context managers of the metric classes (prometheus_client's ``Timer``,
``InprogressTracker`` and ``ExceptionCounter``): not hot, so plain Python. The native methods
``time()``, ``track_inprogress()`` and ``count_exceptions()`` build them."""

import functools
import time


class _Block:
    """A context manager that is also a decorator: each call of a decorated function runs in a
    fresh block, so recursive and concurrent calls do not share state."""

    def _fresh(self):
        raise NotImplementedError

    def __call__(self, f):
        @functools.wraps(f)
        def wrapped(*args, **kwargs):
            with self._fresh():
                return f(*args, **kwargs)

        return wrapped


class Timer(_Block):
    """Calls ``getattr(metric, callback)(seconds)`` with the duration of the block."""

    def __init__(self, metric, callback):
        self._metric = metric
        self._callback = callback
        self._start = None

    def _fresh(self):
        return Timer(self._metric, self._callback)

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, typ, value, traceback):
        duration = max(time.perf_counter() - self._start, 0)
        getattr(self._metric, self._callback)(duration)
        return False


class InprogressTracker(_Block):
    """+1 on entry, -1 on exit."""

    def __init__(self, gauge):
        self._gauge = gauge

    def _fresh(self):
        return self

    def __enter__(self):
        self._gauge.inc()

    def __exit__(self, typ, value, traceback):
        self._gauge.dec()
        return False


class ExceptionCounter(_Block):
    """Counts exceptions of ``exception`` leaving the block; does not swallow them."""

    def __init__(self, counter, exception):
        self._counter = counter
        self._exception = exception

    def _fresh(self):
        return self

    def __enter__(self):
        return None

    def __exit__(self, typ, value, traceback):
        if isinstance(value, self._exception):
            self._counter.inc()
        return False
