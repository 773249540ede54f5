"""The case report: evidence inventory (re-verified), findings, method, validation, limitations.

:func:`devrecd.report.collect.build_report` gathers the content, :func:`devrecd.report.render.write_report`
writes ``report.html`` (self-contained), ``report.json`` (the same content; ``schema.json`` here
describes it) and the PNG figures.
"""

from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("schema.json")
