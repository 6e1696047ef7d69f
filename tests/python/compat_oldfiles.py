"""Writes, into DIR (argv[1]), multiprocess files of older prometheus_client layouts, one of the
current layout (written by prometheus_client 0.26's own MmapedDict), garbage files and valid empty
files. The values are fixed; tests/it/python_compat.rs holds the expected merged samples.

Layouts (see /work/shared/reference/python-multiproc-format.md):
- before 0.16: key json.dumps([metric, sample, labels], sort_keys=True), entry value 8 bytes,
  files 1 MiB;
- 0.16 and 0.17: key with a 4th element (help), entry value 8 bytes;
- 0.18 and later: 4-element key, value + timestamp (16 bytes).
Ids are above the kernel's PID_MAX_LIMIT (4194304), so no such process can ever be alive.
"""
import json
import os
import random
import struct
import sys

DIR = sys.argv[1]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = DIR

from prometheus_client.mmap_dict import MmapedDict, mmap_key  # noqa: E402


def key3(metric, sample, labels):
    return json.dumps([metric, sample, labels], sort_keys=True)


def key4(metric, sample, labels, help_text):
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def entry(key, value, timestamp=None, raw_key=None):
    enc = raw_key if raw_key is not None else key.encode("utf-8")
    padded = enc + b" " * (8 - (len(enc) + 4) % 8)
    b = struct.pack("i", len(enc)) + padded + struct.pack("d", value)
    if timestamp is not None:
        b += struct.pack("d", timestamp)
    return b


def write(name, entries, size, used=None):
    body = b"".join(entries)
    if used is None:
        used = 8 + len(body)
    data = struct.pack("i", used) + b"\0" * 4 + body
    with open(os.path.join(DIR, name), "wb") as f:
        f.write(data)
        f.truncate(size)


MIB = 1 << 20
KIB64 = 1 << 16

# --- before 0.16: 3-element keys, 8-byte values ---
write("counter_4194401.db", [
    entry(key3("compat_old15", "compat_old15_total", {"route": "/a"}), 3.0),
    entry(key3("compat_old15", "compat_old15_total", {"route": '/ü"\n'}), 4.5),
    entry(key3("compat_shared", "compat_shared_total", {}), 7.0),
], MIB)
# Entry order as prometheus_client writes it: `_sum` first, then the buckets.
write("histogram_4194401.db", [
    entry(key3("compat_old15_h", "compat_old15_h_sum", {}), 3.25),
    entry(key3("compat_old15_h", "compat_old15_h_bucket", {"le": "0.5"}), 2.0),
    entry(key3("compat_old15_h", "compat_old15_h_bucket", {"le": "1.0"}), 1.0),
    entry(key3("compat_old15_h", "compat_old15_h_bucket", {"le": "+Inf"}), 1.0),
], MIB)
# A single entry: only `used` tells 8-byte from 16-byte values.
write("gauge_max_4194401.db", [
    entry(key3("compat_old15_g", "compat_old15_g", {}), 9.5),
], MIB)

# --- 0.16 / 0.17: 4-element keys, 8-byte values ---
write("counter_4194402.db", [
    entry(key4("compat_old17", "compat_old17_total", {"route": "/a"}, "Old help."), 11.0),
    entry(key4("compat_shared", "compat_shared_total", {}, "Shared."), 20.0),
], MIB)
write("summary_4194402.db", [
    entry(key4("compat_old17_s", "compat_old17_s_count", {}, "Old summary."), 3.0),
    entry(key4("compat_old17_s", "compat_old17_s_sum", {}, "Old summary."), 1.5),
], MIB)
write("gauge_all_4194402.db", [
    entry(key4("compat_old17_all", "compat_old17_all", {"x": "y"}, "Old all."), 2.5),
], MIB)

# --- current layout, written by prometheus_client 0.26 itself ---
d = MmapedDict(os.path.join(DIR, "counter_4194403.db"))
d.write_value(mmap_key("compat_shared", "compat_shared_total", [], [], "Shared."), 100.0, 0.0)
d.write_value(mmap_key("compat_new", "compat_new_total", ["route"], ["/a"], "New."), 1.0, 0.0)
d.close()
# Entries in an order prometheus_client's own writer does not produce, but its collector does not
# care about (it merges by key): `_sum` after `+Inf`, and `+Inf` first.
d = MmapedDict(os.path.join(DIR, "histogram_4194403.db"))
for le, v in (("0.5", 1.0), ("1.0", 2.0), ("+Inf", 3.0)):
    d.write_value(mmap_key("compat_order_h", "compat_order_h_bucket", ["case", "le"],
                           ["sum_last", le], "Order."), v, 0.0)
d.write_value(mmap_key("compat_order_h", "compat_order_h_sum", ["case"], ["sum_last"], "Order."),
              4.5, 0.0)
for le, v in (("+Inf", 1.0), ("1.0", 2.0), ("0.5", 3.0)):
    d.write_value(mmap_key("compat_order_h", "compat_order_h_bucket", ["case", "le"],
                           ["inf_first", le], "Order."), v, 0.0)
d.write_value(mmap_key("compat_order_h", "compat_order_h_sum", ["case"], ["inf_first"], "Order."),
              2.0, 0.0)
d.close()

# --- garbage: each must be skipped as a whole and counted ---
with open(os.path.join(DIR, "counter_4194404.db"), "wb") as f:
    f.write(random.Random(4).randbytes(4096))
# Valid framing, but the key is a JSON object, not a list.
write("counter_4194405.db", [
    entry(json.dumps({"compat_garbage": 1}), 1000.0, 0.0),
], KIB64)
# `used` points past the end of the file (its first entry is well-formed).
write("histogram_4194406.db", [
    entry(key4("compat_garbage_h", "compat_garbage_h_sum", {}, "G."), 1000.0, 0.0),
], 4096, used=100000)
# A key length far past `used`.
write("summary_4194407.db", [
    struct.pack("i", 0x7FFFFFF0) + b'["compat_garbage_s"' + b" " * 5 + struct.pack("dd", 1.0, 0.0),
], KIB64)
# A key that is not UTF-8.
write("gauge_max_4194408.db", [
    entry(None, 1000.0, 0.0, raw_key=b'["compat_garbage_g", "compat_garbage_g", {}, "\xff\xfe"]'),
], KIB64)

# --- valid and empty: a fresh file (used = 8), and one a writer has just truncated (used = 0) ---
write("counter_4194409.db", [], KIB64)
with open(os.path.join(DIR, "counter_4194410.db"), "wb") as f:
    f.truncate(KIB64)
