"""The report as ONE self-contained HTML file (inline CSS, images as data URIs, nothing fetched) and
as JSON with the same content; the PNG figures are also written beside them.

The HTML prints to A4 (``@page``, ``@media print``): sections start on a new page where that keeps
a table or a figure whole, and nothing interactive is needed to read it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from html import escape
from pathlib import Path
from typing import Any

from devrecd.fsutil import atomic_write
from devrecd.report.collect import Figures

CSS = """
:root { --ink:#1b1f24; --muted:#5b6470; --line:#d5dae0; --bad:#b3261e; --ok:#1e7d32; --warn:#9a6700; --hp:#1f5fa8; }
* { box-sizing: border-box; }
body { font: 10.5pt/1.45 "DejaVu Sans", "Liberation Sans", Arial, sans-serif; color: var(--ink); margin: 0 auto;
       max-width: 1050px; padding: 24px 28px; background: #fff; }
h1 { font-size: 19pt; margin: 0 0 4px; } h2 { font-size: 14pt; border-bottom: 2px solid var(--ink); padding-bottom: 2px;
     margin: 26px 0 10px; } h3 { font-size: 11.5pt; margin: 14px 0 6px; }
.sub { color: var(--muted); margin: 0 0 14px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; font-size: 9pt; }
th, td { border: 1px solid var(--line); padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; font-weight: 600; }
table.kv th { width: 28%; }
.hash { font-family: "DejaVu Sans Mono", monospace; font-size: 7.8pt; word-break: break-all; }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 8.5pt; font-weight: 600; white-space: nowrap; }
.ok { background: #e3f4e6; color: var(--ok); } .bad { background: #fde7e5; color: var(--bad); }
.warn { background: #fff4d6; color: var(--warn); } .muted { color: var(--muted); }
.card { border: 1px solid var(--line); border-radius: 4px; padding: 8px 12px; margin: 10px 0; page-break-inside: avoid;
        break-inside: avoid; }
.lr { font-size: 12pt; font-weight: 600; color: var(--hp); }
.summary { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0; }
.summary div { border: 1px solid var(--line); border-radius: 4px; padding: 4px 10px; }
.summary b { font-size: 13pt; display: block; }
img { max-width: 100%; height: auto; } .figs { display: flex; flex-wrap: wrap; gap: 12px; } .figs img { max-width: 48%; }
ul.lim li { margin-bottom: 4px; }
footer { margin-top: 24px; color: var(--muted); font-size: 8pt; border-top: 1px solid var(--line); padding-top: 6px; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 9pt; }
  h2 { break-after: avoid; page-break-after: avoid; }
  h2.newpage { break-before: page; page-break-before: always; }
  tr, .card, .figs { break-inside: avoid; page-break-inside: avoid; }
  .figs img { max-width: 47%; }
}
"""


def _e(v: Any) -> str:
    return "" if v is None else escape(str(v))


def _img(fig: dict[str, str] | None, figures: Figures, alt: str) -> str:
    if not fig:
        return ""
    data = base64.b64encode(figures.files[fig["file"]]).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _kv(rows: list[tuple[str, Any]], raw: bool = False) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v if raw else _e(v)}</td></tr>" for k, v in rows if v not in (None, ""))
    return f'<table class="kv">{body}</table>'


def _hash(h: str | None) -> str:
    return f'<span class="hash">{_e(h)}</span>' if h else '<span class="muted">-</span>'


def _integrity(status: str) -> str:
    cls = {"verified": "ok", "CHANGED since intake": "bad", "missing": "bad", "unreadable": "bad"}.get(status, "warn")
    mark = {"verified": "&#10003; ", "CHANGED since intake": "&#9888; "}.get(status, "")
    return f'<span class="badge {cls}">{mark}{_e(status)}</span>'


def _num(v: Any, digits: int) -> str:
    return "" if v is None else f"{float(v):.{digits}f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2%}"


def _lr_block(lr: dict[str, Any] | None, hp_device: str | None) -> str:
    if not lr:
        return ""
    if lr.get("log10_lr") is None:
        return f'<p><b>Likelihood ratio:</b> <span class="badge warn">not given</span> {_e(lr.get("lr_withheld"))}</p>'
    bounded = " (at the ELUB bound: the calibration data support no larger value)" if lr.get("bounded") else ""
    warns = "".join(f'<br><span class="badge warn">condition</span> {_e(w)}' for w in lr.get("condition_warnings") or [])
    return (f'<p><b>Likelihood ratio</b> (Hp: made with <b>{_e(hp_device)}</b>): <span class="lr">LR = {lr["lr"]:.4g} '
            f'(log10 LR {lr["log10_lr"]:+.2f})</span>{_e(bounded)}<br><b>Verbal equivalent (ENFSI):</b> '
            f'{_e(lr.get("verbal"))}{warns}</p>')


def _candidates(rows: list[dict[str, Any]]) -> str:
    # Scores only: an unbounded per-candidate LLR is not a reportable LR (the bounded one is shown apart).
    if not rows:
        return ""
    head = "<tr><th>rank</th><th>device</th><th>score</th></tr>"
    body = "".join(f"<tr><td>{i + 1}</td><td>{_e(r.get('device'))}</td><td>{_e(r.get('score'))}</td></tr>"
                   for i, r in enumerate(rows))
    return f"<table>{head}{body}</table>"


def render_html(doc: dict[str, Any], figures: Figures, json_sha256: str = "") -> str:
    """The report document as one self-contained HTML page."""
    case, summ = doc["case"], doc["summary"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>Device examination report {_e(case.get('case_id'))}</title><style>{CSS}</style></head><body>"]
    parts.append("<h1>Recording-device examination report</h1>")
    parts.append(f'<p class="sub">devrecd {_e(case["software_version"])} &middot; created {_e(case["created"])} (UTC)</p>')
    parts.append(_kv([("Case", case.get("case_id") or "(not set)"), ("Examiner", case.get("examiner") or "(not set)"),
                      ("Laboratory", case.get("laboratory")), ("Host", case.get("host")), ("Platform", case.get("platform")),
                      ("Sources", "; ".join(case.get("sources", [])))]))
    boxes = [("files", summ["files"]), ("judged", summ["judged"]), ("compared", summ["compared"]),
             ("duplicates", summ["duplicate"]), ("failed", summ["failed"]), ("changed since intake", summ["changed"]),
             ("missing", summ["missing"])]
    parts.append('<div class="summary">' + "".join(
        f'<div class="{"bad" if k in ("changed since intake", "missing", "failed") and v else ""}"><b>{v}</b>{_e(k)}</div>'
        for k, v in boxes) + "</div>")

    # 1. inventory
    parts.append("<h2>1. Evidence inventory</h2><p class=\"muted\">Every file examined, with the SHA-256 recorded at "
                 "intake, re-computed from the file when this report was made.</p>")
    head = ("<tr><th>#</th><th>file</th><th>size (B)</th><th>SHA-256 at intake / now</th><th>duration (s)</th>"
            "<th>rate (Hz)</th><th>codec / container</th><th>outcome</th><th>levels</th></tr>")
    rows = []
    for e in doc["inventory"]:
        integ = e["integrity"]
        now = "" if integ.get("sha256_now") in (None, e.get("sha256")) else f"<br>now: {_hash(integ['sha256_now'])}"
        rate = _e(e.get("native_rate"))
        if e.get("resampled"):
            rate += f" &rarr; {_e(e.get('sample_rate'))} (resampled)"
        cond = " / ".join(_e(e.get(k)) for k in ("codec", "container") if e.get(k))
        extra = ", ".join(f"{k} {_e(e[k])}" for k in ("bitrate", "bandwidth") if e.get(k) is not None)
        outcome = _e(e["outcome"]) + (f": {_e(e.get('reason'))} <span class=\"muted\">{_e(e.get('detail'))}</span>"
                                      if e.get("reason") else "")
        if e.get("duplicate_of_path"):
            outcome += f" <span class=\"muted\">(same content as {_e(e['duplicate_of_path'])})</span>"
        lv = e.get("levels")
        levels = "" if not lv else (f"{_e(lv['rms_dbfs'])} dBFS, peak {_e(lv['peak'])}"
                                    + "".join(f' <span class="badge warn">{_e(f)}</span>' for f in lv["flags"]))
        stream = "".join(f' <span class="badge warn">{_e(f)}</span>' for f in integ.get("flags", [])) + "".join(
            f'<br><span class="muted">{_e(n)}</span>' for n in integ.get("notes", []))
        rows.append(f"<tr><td>{e['n']}</td><td>{_e(e['path'])}</td><td>{_e(e.get('size'))}</td>"
                    f"<td>{_hash(e.get('sha256'))}{now}<br>{_integrity(integ['status'])}{stream}</td>"
                    f"<td>{_num(e.get('duration'), 2)}</td><td>{rate}</td><td>{cond}{'<br>' + extra if extra else ''}</td>"
                    f"<td>{outcome}</td><td>{levels}</td></tr>")
    parts.append(f"<table>{head}{''.join(rows)}</table>")

    # 2. findings
    parts.append('<h2 class="newpage">2. Findings per recording</h2>')
    if not doc["recordings"]:
        parts.append("<p class=\"muted\">No recording was judged or compared.</p>")
    for r in doc["recordings"]:
        card = [f'<div class="card"><h3>#{r["n"]} {_e(Path(r["path"]).name)}</h3>'
                f'<p class="muted">{_e(r["path"])} &middot; {_integrity(r["integrity"])}'
                + "".join(f' <span class="badge warn">{_e(f)}</span>' for f in r.get("flags", [])) + "</p>"]
        if "comparison" in r:
            c = r["comparison"]
            card.append(f'<p><b>Comparison with the reference device {_e(c["reference_device"])}</b> '
                        f'({len(c["references"])} reference recording(s), {_e(c.get("reference_source"))}): '
                        f'score {_e(c["score"])}</p>')
            card.append(_lr_block(c, c["reference_device"]))
            refs = "".join(f"<tr><td>{_e(f['path'])}</td><td>{_hash(f['sha256'])}</td></tr>" for f in c["references"])
            card.append(f"<table><tr><th>reference</th><th>SHA-256</th></tr>{refs}</table>")
        if "open_set" in r:
            o = r["open_set"]
            verdict = _e(o["device"]) + ("" if o.get("accepted") else f" (best candidate {_e(o.get('candidate'))})")
            card.append(f"<p><b>Open-set verdict:</b> {verdict}; score {_e(o['score'])}; decision: log10 LR "
                        f">= {_e(o.get('log10_threshold'))} ({_e(o.get('rule'))}) "
                        f"<span class=\"muted\">(condition {_e(o.get('condition'))}: {_e(o.get('calibration_source'))})</span></p>")
            card.append(_candidates(o.get("top_k") or []))
            card.append(_lr_block(r.get("lr"), (r.get("lr") or {}).get("reference_device")))
        if "closed_set" in r:
            cs = r["closed_set"]
            card.append(f"<p><b>Closed-set verdict</b> (one of the model's training devices): {_e(cs['device'])}, "
                        f"probability {_e(cs['score'])}"
                        + (f"; windows agreeing: {_e(r.get('windows_agreeing'))}" if r.get("windows_agreeing") else "")
                        + "</p>")
            card.append(_candidates(cs.get("top_k") or []))
        card.append(_img(r.get("timeline"), figures, f"score timeline of recording {r['n']}"))
        card.append("</div>")
        parts.append("".join(card))

    # 3. method
    m = doc["method"]
    parts.append('<h2 class="newpage">3. Method</h2>')
    parts.append(_kv([("Hp (prosecution proposition)", m["propositions"]["hp"]),
                      ("Hd (defence proposition)", m["propositions"]["hd"])]))
    mc = m["model"]
    if mc.get("arch"):
        parts.append("<h3>Model card</h3>")
        fe = mc.get("frontend") or {}
        parts.append(_kv([
            ("Model", _e(mc.get("model"))), ("Architecture", _e(mc.get("architecture"))),
            ("Training devices", _e(f"{len(mc.get('labels', []))}: " + ", ".join(mc.get("labels", [])))),
            ("Training data (manifest SHA-256)", _hash(mc.get("training_data_sha256"))),
            ("Frontend", _e(", ".join(f"{k} {v}" for k, v in fe.items()))),
            ("Frontend fingerprint", _hash(mc.get("frontend_fingerprint"))),
            ("ONNX SHA-256 (contract / now)", _hash(mc.get("onnx_sha256")) + "<br>" + _hash(mc.get("onnx_sha256_now"))),
            ("Contract SHA-256", _hash(mc.get("contract_sha256"))), ("Checkpoint SHA-256", _hash(mc.get("checkpoint_sha256"))),
            ("Precision / opset", _e(f"{mc.get('precision')} / {mc.get('opset')}")),
            ("Same model as the verdicts", _e(mc.get("matches_verdicts"))),
        ], raw=True))
    elif mc.get("note"):
        parts.append(f'<p class="muted">{_e(mc["note"])}</p>')
    if mc.get("backends_used"):
        rows = "".join(f"<tr><td>{_e(b['backend'])}</td><td>{_hash(b['model_sha256'])}</td><td>{_hash(b['contract_sha256'])}</td></tr>"
                       for b in mc["backends_used"])
        parts.append(f"<h3>Backends that made the verdicts</h3><table><tr><th>backend</th><th>model SHA-256</th>"
                     f"<th>contract SHA-256</th></tr>{rows}</table>")
    if m.get("registry"):
        rg = m["registry"]
        emb = rg.get("embedder") or {}
        parts.append("<h3>Device registry (open set)</h3>")
        parts.append(_kv([("Registry", _e(rg.get("path"))), ("Registry SHA-256", _hash(rg.get("sha256"))),
                          ("Enrolled devices", _e(", ".join(rg.get("devices") or []))),
                          ("Embedder", _e(f"{emb.get('arch')} ({emb.get('dim')}-d), {emb.get('source')}") if emb else ""),
                          ("Embedder fingerprint", _hash(emb.get("fingerprint")) if emb else ""),
                          ("Note", _e(rg.get("note") or rg.get("error")))], raw=True))
    for sc in m.get("scorers") or []:
        parts.append("<h3>Comparison scorer</h3>")
        parts.append(_kv([("Kind", _e(sc.get("kind"))), ("Architecture", _e(sc.get("arch"))),
                          ("Model", _e(sc.get("source"))), ("Fingerprint", _hash(sc.get("fingerprint")))], raw=True))
    scale = "".join(f"<tr><td>{_e(r['lr'])}</td><td>{_e(r['support'])}</td></tr>" for r in m["verbal_scale"])
    parts.append("<h3>Verbal scale (ENFSI 2015)</h3><p class=\"muted\">For an LR below 1 the reciprocal is read, as "
                 f"support for Hd. The words accompany the number; they do not replace it.</p><table><tr><th>LR</th>"
                 f"<th>support</th></tr>{scale}</table>")

    # 4. validation
    v = doc.get("validation")
    parts.append('<h2 class="newpage">4. Validation</h2>')
    if not v:
        parts.append("<p><span class=\"badge warn\">no calibration</span> No LR calibration was available for these "
                     "results; no likelihood ratio is reported.</p>")
    else:
        cal, mt = v["calibration"], v["metrics"]
        pop, cond = cal["population"], cal["conditions"]
        parts.append(_kv([
            ("Calibration", _e(cal["method"])), ("Calibration SHA-256", _hash(cal["sha256"])),
            ("Fitted", _e(cal.get("fitted_at"))), ("Relevant population", _e(pop.get("description"))),
            ("Devices", _e(", ".join(pop.get("trial_devices", [])))),
            ("Data set", _e(f"{pop.get('dataset')} (selection {pop.get('selection')})" if pop.get("dataset") else "")),
            ("Conditions", _e(f"codecs {cond.get('codecs')}, native rates {cond.get('native_rates')} Hz, "
                              f"{cond.get('duration_min')}-{cond.get('duration_max')} s, {cond.get('recordings')} recordings")),
            ("LR map", _e(f"log10 LR = {cal['slope']:.4g} x score + {cal['offset']:.4g}, bounded to "
                          f"[{cal['lower']:g}, {cal['upper']:g}] (ELUB)")),
            ("Fitted on", _e(cal.get("basis"))),
            ("Decision", _e(f"{cal['decision']['rule']}: a device is named when log10 LR >= "
                            f"{cal['decision']['log10_threshold']:+.3f} (prior {cal['decision']['prior']:g}, "
                            f"C_miss {cal['decision']['cost_miss']:g}, C_fa {cal['decision']['cost_false_alarm']:g})"
                            if cal.get("decision") else "")),
        ], raw=True))
        parts.append(_kv([
            ("Trials", f"{mt['n_target']} same-device, {mt['n_nontarget']} different-device"),
            ("EER", _pct(mt["eer"])), ("minDCF (P_target 0.01)", f"{mt['min_dcf']:.3f}"),
            ("Cllr, held-out LRs", f"{mt['cllr']:.3f} bits"), ("Cllr_min (discrimination only)", f"{mt['cllr_min']:.3f} bits"),
            ("Cllr of the raw scores taken as log10 LRs",
             f"{mt['cllr_raw_scores']:.3f} bits" if "cllr_raw_scores" in mt else "not recorded"),
            ("Misleading evidence, same device (LR < 1)", f"{mt['misleading_hp']} of {mt['n_target']} ({_pct(mt['misleading_hp_rate'])})"),
            ("Misleading evidence, different device (LR > 1)", f"{mt['misleading_hd']} of {mt['n_nontarget']} ({_pct(mt['misleading_hd_rate'])})"),
            ("Held-out LRs", f"{mt.get('folds')}-fold cross-validation by recording"),
        ]))
        parts.append('<div class="figs">' + _img(v["tippett"], figures, "Tippett plot") + _img(v["det"], figures, "DET curve") + "</div>")
        if v["condition_mismatches"]:
            rows = "".join(f"<tr><td>#{x['n']}</td><td>{_e(x['path'])}</td><td>{_e('; '.join(x['problems']))}</td>"
                           f"<td>{'no LR given' if x['blocks_lr'] else 'LR given, with this warning'}</td></tr>"
                           for x in v["condition_mismatches"])
            parts.append('<p><span class="badge warn">warning</span> Case recordings whose conditions differ from the '
                         f'calibration:</p><table><tr><th>#</th><th>file</th><th>difference</th><th>consequence</th></tr>{rows}</table>')
        else:
            parts.append('<p><span class="badge ok">conditions</span> Every analysed case recording lies within the '
                         "calibration's rate, codec and duration range.</p>")

    # 5. limitations
    parts.append("<h2>5. Limitations</h2><ul class=\"lim\">" + "".join(f"<li>{_e(x)}</li>" for x in doc["limitations"]) + "</ul>")
    parts.append(f"<footer>Machine-readable copy: report.json{(' (SHA-256 ' + _e(json_sha256) + ')') if json_sha256 else ''}; "
                 "figures also as PNG files beside this page. Generated by devrecd; this page loads nothing from "
                 "anywhere.</footer></body></html>")
    return "".join(parts)


def write_report(doc: dict[str, Any], figures: Figures, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.html and the PNG figures into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in figures.files.items():
        paths[name] = atomic_write(out / name, png)
    blob = json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False)
    paths["report.json"] = atomic_write(out / "report.json", blob)
    paths["report.html"] = atomic_write(out / "report.html",
                                        render_html(doc, figures, hashlib.sha256(blob.encode()).hexdigest()))
    return paths
