"""The report as ONE self-contained HTML file (inline CSS, images as data URIs, nothing fetched) and
as JSON with the same content; the PNG figures are also written beside them. The page is the
Jinja2 template ``templates/report.html.j2``, rendered with autoescaping on.

The HTML prints to A4 (``@page``, ``@media print``): sections start on a new page where that keeps
a table or a figure whole, and nothing interactive is needed to read it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from devrecd.fsutil import atomic_write
from devrecd.report.collect import Figures


def _num(v: Any, digits: int) -> str:
    return "" if v is None else f"{float(v):.{digits}f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2%}"


@functools.cache
def _template() -> Any:
    """The report template (``templates/report.html.j2``), autoescaped. jinja2 comes with the
    ``report`` extra and is imported here only: serving never renders a report."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("devrecd.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             finalize=lambda v: "" if v is None else v)
    env.filters.update(fmt=format, num=_num, pct=_pct, basename=lambda p: Path(p).name)
    return env.get_template("report.html.j2")


def render_html(doc: dict[str, Any], figures: Figures, json_sha256: str = "") -> str:
    """The report document as one self-contained HTML page."""
    def png_base64(name: str) -> str:
        return base64.b64encode(figures.files[name]).decode()

    return _template().render(doc=doc, json_sha256=json_sha256, png_base64=png_base64)


def write_report(doc: dict[str, Any], figures: Figures, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.html and the PNG figures into ``out_dir``; returns their paths."""
    blob = json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False)
    html = render_html(doc, figures, hashlib.sha256(blob.encode()).hexdigest())  # before any file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in figures.files.items():
        paths[name] = atomic_write(out / name, png)
    paths["report.json"] = atomic_write(out / "report.json", blob)
    paths["report.html"] = atomic_write(out / "report.html", html)
    return paths
