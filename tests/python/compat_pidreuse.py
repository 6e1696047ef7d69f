"""Real pid reuse against `shmetrics serve --compact-python`. Run as pid 1 of a new pid namespace:

    unshare --pid --fork --kill-child --mount-proc PYTHON compat_pidreuse.py SHMETRICS DIR ROUNDS

Starts `SHMETRICS serve --dir DIR --compact-python --upkeep-interval 0.1` inside the namespace, so
that it sees the same pids as the writers, and prints `ADDR <host:port>`. Then, for each round i,
with its own label compat_reuse_total{round="i"}:

- writer A (pid N) increments the series by 10, stays alive for a while and exits; it is reaped;
- writer B gets the same pid N (through /proc/sys/kernel/ns_last_pid), and increments the same
  series by 5, about once per millisecond, for 2 s; then it reports how many increments it made.

prometheus_client in B continues A's file (counter_N.db, from 10) if B finds it, or starts a new
file if the aggregator already moved A's file away: either way the job total of round i must be
exactly 10 + 5 * count_i. Two kinds of rounds:

- even rounds: A lives 0.1·i s; B is forked 0 to 0.15 s after A was reaped (against the 0.1 s
  upkeep) and opens the file at once;
- odd rounds: A lives more than 3 s (so that B starts well after A's file was created: the
  aggregator's check of the process start time against the file's creation applies); B is forked
  at once, then waits 5 to 120 ms before it opens the file: the pid is alive but does not have the
  file open yet, so the aggregator may rename the file aside while B opens it, and must then undo
  the rename. B watches the path of its open file and reports whether it was ever renamed.

To widen the window between the aggregator's liveness check of a file and its rename (which happen
in one pass over every file), the directory is padded with the (empty, valid) files of 400 live
sleeping processes: a pass then takes tens of milliseconds.

A last round gives the pid of a dead writer U (a liveall gauge and a counter; alive 3.2 s) to a
process that never uses prometheus_client and runs until the end: U's live gauge must vanish and
its counter stay.

When every writer has exited and the aggregator has compacted their files (or 10 s passed), prints

    ROUND <i> <pid A> <pid B> <reused: 1 if B got A's pid> <B found A's file: 0/1> <count>
          <B saw its file renamed: 0/1>
    UNRELATED <pid of U> <pid of the new process> <reused: 0/1>
    DONE

then waits for a line (or EOF) on stdin before stopping everything.
"""
import os
import sys
import time

SHMETRICS, DIR, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ["PROMETHEUS_MULTIPROC_DIR"] = DIR

import signal  # noqa: E402
import subprocess  # noqa: E402

from prometheus_client import Counter, Gauge  # noqa: E402
from prometheus_client.mmap_dict import MmapedDict  # noqa: E402

assert os.getpid() == 1, "run me as pid 1 of a new pid namespace (unshare --pid --fork)"
os.makedirs(DIR, exist_ok=True)

KINDS = ["counter", "histogram", "summary"] + ["gauge_" + m for m in (
    "all liveall min livemin max livemax sum livesum mostrecent livemostrecent".split())]
NPAD = int(os.environ.get("COMPAT_NPAD", "400"))


def fork_at(pid_wanted, fn):
    """Forks with the pid `pid_wanted` (if no other process or thread is created meanwhile)."""
    if pid_wanted is not None:
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid_wanted - 1))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


pads = [fork_at(None, lambda: time.sleep(120)) for _ in range(NPAD)]
for p in pads:
    for k in KINDS:
        MmapedDict(os.path.join(DIR, "%s_%d.db" % (k, p))).close()

log_path = DIR.rstrip("/") + ".log"
log = open(log_path, "w")
env = dict(os.environ, SHMETRICS_LOG="info", NO_COLOR="1")
serve = subprocess.Popen(
    [SHMETRICS, "serve", "--dir", DIR, "--listen", "127.0.0.1:0",
     "--compact-python", "--upkeep-interval", "0.1"],
    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
)
addr = None
deadline = time.time() + 20
while addr is None:
    if serve.poll() is not None or time.time() > deadline:
        sys.exit("shmetrics did not start; log %s:\n%s" % (log_path, open(log_path).read()))
    for line in open(log_path):
        if "serving http://" in line:
            addr = line.split("serving http://")[1].split("/")[0]
    time.sleep(0.02)
print("ADDR", addr, flush=True)


def writer_a(i, hold):
    Counter("compat_reuse", "Pid reuse.", ["round"], registry=None).labels(str(i)).inc(10)
    time.sleep(hold)


def writer_b(i, wfd, open_delay):
    time.sleep(open_delay)
    name = "counter_%d.db" % os.getpid()
    existed = os.path.exists(os.path.join(DIR, name))
    c = Counter("compat_reuse", "Pid reuse.", ["round"], registry=None).labels(str(i))
    fd_link = None
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + fd).endswith("/" + name):
                fd_link = "/proc/self/fd/" + fd
        except OSError:
            pass
    renamed = False
    count = 0
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        c.inc(5)
        count += 1
        if fd_link is not None and not renamed:
            renamed = not os.readlink(fd_link).endswith("/" + name)
        time.sleep(0.001)
    os.write(wfd, b"%d %d %d\n" % (int(existed), count, int(renamed)))


def writer_u():
    Gauge("compat_reuse_live", "Live.", multiprocess_mode="liveall", registry=None).set(7)
    Counter("compat_reuse_unrelated", "Unrelated.", registry=None).inc(3)
    time.sleep(3.2)


def sleeper():
    time.sleep(60)


FORK_DELAYS = [0.0, 0.0, 0.0005, 0.002, 0.01, 0.03, 0.06, 0.09, 0.15]
OPEN_DELAYS = [0.005, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12]
holds = [0.1 * i + (3.2 if i % 2 else 0.0) for i in range(ROUNDS)]
a_pids = [fork_at(10000 + 100 * i, lambda: writer_a(i, holds[i])) for i in range(ROUNDS)]
u_a = fork_at(10000 + 100 * ROUNDS, writer_u)
rounds = []
for i in sorted(range(ROUNDS), key=lambda i: holds[i]):
    a = a_pids[i]
    _, status = os.waitpid(a, 0)
    assert status == 0, "writer A failed"
    open_delay = 0.0
    if i % 2:
        open_delay = OPEN_DELAYS[(i // 2) % len(OPEN_DELAYS)]
    else:
        time.sleep(FORK_DELAYS[(i // 2) % len(FORK_DELAYS)])
    r, w = os.pipe()
    b = fork_at(a, lambda: writer_b(i, w, open_delay))
    os.close(w)
    rounds.append((i, a, b, r))
    if u_a is not None and holds[i] > 3.2:
        _, status = os.waitpid(u_a, 0)
        assert status == 0, "writer U failed"
        u_c = fork_at(u_a, sleeper)
        u_done, u_a = (u_a, u_c), None
if u_a is not None:
    _, status = os.waitpid(u_a, 0)
    u_done = (u_a, fork_at(u_a, sleeper))

results = []
for i, a, b, r in rounds:
    with os.fdopen(r) as f:
        out = f.read().split()
    _, status = os.waitpid(b, 0)
    assert status == 0 and len(out) == 3, "writer B failed"
    results.append((i, a, b, int(a == b), int(out[0]), int(out[1]), int(out[2])))

deadline = time.time() + 10
pids = {a for _, a, _, _ in rounds} | {b for _, _, b, _ in rounds} | {u_done[0]}
while time.time() < deadline:
    left = [n for n in os.listdir(DIR) if n.endswith(".db") and int(n[:-3].split("_")[-1]) in pids]
    if not left:
        break
    time.sleep(0.05)

for res in sorted(results):
    print("ROUND %d %d %d %d %d %d %d" % res, flush=True)
print("UNRELATED %d %d %d" % (u_done[0], u_done[1], int(u_done[0] == u_done[1])), flush=True)
print("DONE", flush=True)
sys.stdin.readline()
serve.terminate()
serve.wait()
for p in pads + [u_done[1]]:
    os.kill(p, signal.SIGKILL)
    os.waitpid(p, 0)
