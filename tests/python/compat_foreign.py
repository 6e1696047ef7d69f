"""Writes into DIR (argv[1]) *.db files that are not prometheus_client's: SQLite databases named
`data.db` and `counter_99.db`, an empty `counter_98.db`; and one real prometheus_client 0.26 file
(`counter_4194501.db`, compat_ok_total = 5) whose value must still be served exactly.
"""
import os
import sqlite3
import sys

DIR = sys.argv[1]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = DIR

from prometheus_client.mmap_dict import MmapedDict, mmap_key  # noqa: E402

for name in ("data.db", "counter_99.db"):
    con = sqlite3.connect(os.path.join(DIR, name))
    con.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")
    con.executemany("INSERT INTO t VALUES (?, ?)", [("a", 1), ("b", 2), ("c", 3)])
    con.commit()
    con.close()

open(os.path.join(DIR, "counter_98.db"), "wb").close()

d = MmapedDict(os.path.join(DIR, "counter_4194501.db"))
d.write_value(mmap_key("compat_ok", "compat_ok_total", [], [], "Still served."), 5.0, 0.0)
d.close()
