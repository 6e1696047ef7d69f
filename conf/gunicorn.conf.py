# gunicorn configuration for a Python app using prometheus_client, run under shmetrics. From the
# app's directory:
#
#     shmetrics run -- gunicorn -c conf/gunicorn.conf.py myapp:app
#     shmetrics run --compact-python -- gunicorn -c conf/gunicorn.conf.py myapp:app   # max_requests
#
# This repository's test app (tests/python/app.py), from the repository's root:
#
#     shmetrics run -- gunicorn -c conf/gunicorn.conf.py --chdir tests/python app:app
#
# `shmetrics run` creates an empty private directory, exports it to gunicorn as both
# SHMETRICS_DIR and PROMETHEUS_MULTIPROC_DIR, serves the merged metrics of every worker on its own
# port (http://127.0.0.1:9180/metrics by default) and forwards gunicorn's signals (HUP, TTIN,
# TTOU, USR2, ...). Compared with the usual prometheus_client multiprocess set-up, this file has
# nothing special in it (the `post_fork` hook below is about stopping workers, not metrics):
#
# - no directory to create or wipe before gunicorn starts: shmetrics hands it over empty;
# - no `child_exit` hook calling `prometheus_client.multiprocess.mark_process_dead(worker.pid)`:
#   shmetrics sees dead workers itself and drops their `live*` gauges (however they died, also
#   SIGKILL or the OOM killer, which no hook sees), while their counters and histograms keep
#   counting;
# - no /metrics view in the app and no MultiProcessCollector: the app only records.
#
# Options given on the command line override what is set here.

# The application's own port. /metrics is not served here but by shmetrics, on its --listen
# address.
bind = "127.0.0.1:8000"

workers = 4
worker_class = "sync"

# Load the app (and so prometheus_client and the metric definitions) once in the master, then
# fork. prometheus_client notices the fork (the pid changed) and gives every worker files of its
# own, so preloading is safe and recommended: it saves memory and start-up time. `preload_app =
# False` works just as well.
preload_app = True

# Recycle workers. Each worker that exits leaves its files behind; with `shmetrics run
# --compact-python` the aggregator folds them into its archive and deletes them, so the directory
# stays proportional to the live workers, and the totals still never go backwards.
max_requests = 1000
max_requests_jitter = 100

timeout = 30
graceful_timeout = 10

# Workers die with their master. `shmetrics run` makes the kernel kill the master (SIGKILL) if
# `run` itself is killed (the OOM killer, supervisord after stopwaitsecs); gunicorn's workers
# would notice only when they next wake up (up to timeout / 2 seconds), holding the listening
# socket until then, so that a replacement fails with "address in use". This asks Linux to send
# each worker SIGTERM (a graceful stop) as soon as its master is gone. (A master that dies before
# the call is caught by gunicorn's own parent check.)
def post_fork(server, worker):
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        server.log.warning("post_fork: prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


# Logs to stderr, as shmetrics does.
accesslog = None
errorlog = "-"
loglevel = "info"
