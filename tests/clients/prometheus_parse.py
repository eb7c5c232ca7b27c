"""Parses Prometheus' text format from the file named by argv[1] with `prometheus_client` (PyPI), the parser
Prometheus' own Python client ships, and prints the families as JSON for
tests/operations.rs: {name: {"type", "help", "samples": [[name, labels, value]...]}}.
"""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

families = {}
with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
for family in text_string_to_metric_families(text):
    families[family.name] = {
        "type": family.type,
        "help": family.documentation,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
print(json.dumps(families))
