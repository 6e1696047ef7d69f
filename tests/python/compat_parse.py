"""Parses Prometheus text (file argv[1]) with prometheus_client's parser (its OpenMetrics parser if
argv[2] is `openmetrics`); prints one line per family and per sample, so that two expositions that
format numbers differently compare by value:

    F <TAB> json(family name) <TAB> type <TAB> json(help)
    S <TAB> sample name{label="json-escaped value",...} <TAB> repr(float value)

Labels are sorted by name; label values are JSON-escaped (ASCII only), so every key is one line.
"""
import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

if len(sys.argv) > 2 and sys.argv[2] == "openmetrics":
    text_string_to_metric_families = openmetrics_families  # noqa: F811

with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
out = []
for fam in text_string_to_metric_families(text):
    out.append("F\t%s\t%s\t%s" % (json.dumps(fam.name), fam.type, json.dumps(fam.documentation)))
    for s in fam.samples:
        labels = ",".join("%s=%s" % (k, json.dumps(v)) for k, v in sorted(s.labels.items()))
        out.append("S\t%s{%s}\t%r" % (s.name, labels, float(s.value)))
sys.stdout.write("\n".join(out) + "\n")
