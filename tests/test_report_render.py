"""The report page from its template, without a case run: every field of a full report document
reaches the page, and every string the page prints is escaped (hostile file names and labels)."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser
from typing import Any

import pytest

pytest.importorskip("jinja2")

from devrecd.report.collect import Figures  # noqa: E402
from devrecd.report.render import render_html  # noqa: E402

SHA = "ab" * 32
PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


def full_document() -> dict[str, Any]:
    """A report document with every section and optional field the page can show."""
    lr = {"log10_lr": 1.5, "lr": 31.6, "bounded": True, "verbal": "moderate support",
          "condition_warnings": ["duration 2.1 s is outside the calibrated range"], "reference_device": "phone 1"}
    return {
        "format": "devrecd-report/1",
        "case": {"case_id": "42/2026", "examiner": "A. Examiner", "laboratory": "Audio lab", "host": "lab-1",
                 "platform": "Linux", "sources": ["/cases/42/state", "/cases/42/compare.jsonl"],
                 "software_version": "1.0", "created": "2026-01-01T00:00:00Z"},
        "summary": {"files": 3, "judged": 1, "compared": 1, "duplicate": 1, "failed": 1, "changed": 1, "missing": 0},
        "inventory": [
            {"n": 1, "path": "/ev/a.wav", "size": 1000, "sha256": SHA, "duration": 12.345, "native_rate": 44100,
             "sample_rate": 32000, "resampled": True, "codec": "pcm_16", "container": "wav", "bitrate": 705,
             "bandwidth": 16000, "outcome": "judged", "reason": "corrupt", "detail": "short read",
             "duplicate_of_path": "/ev/b.wav",
             "levels": {"rms_dbfs": -50.1, "peak": 1.0, "flags": ["quiet", "clipped"]},
             "integrity": {"status": "CHANGED since intake", "sha256_now": "cd" * 32, "flags": ["truncated"],
                           "notes": ["a note on the stream"]}},
            {"n": 2, "path": "/ev/b.wav", "integrity": {"status": "verified"}, "outcome": "duplicate"},
        ],
        "recordings": [
            {"n": 1, "path": "/ev/a.wav", "integrity": "verified", "flags": ["quiet"],
             "comparison": {**lr, "reference_device": "phone 1", "reference_source": "given recordings",
                            "score": 0.81, "references": [{"path": "/refs/r1.wav", "sha256": SHA}]},
             "open_set": {"device": "unknown", "accepted": False, "candidate": "phone 2", "score": 0.4,
                          "log10_threshold": 0.5, "rule": "bayes", "condition": "clean",
                          "calibration_source": "registry", "top_k": [{"device": "phone 2", "score": 0.4}]},
             "lr": lr,
             "closed_set": {"device": "phone 3", "score": 0.9, "top_k": [{"device": "phone 3", "score": 0.9}]},
             "windows_agreeing": "9 of 10", "timeline": {"file": "timeline-1.png"}},
            {"n": 2, "path": "/ev/c.wav", "integrity": "missing",
             "open_set": {"device": "phone 2", "accepted": True, "score": 0.9, "undecided": ["phone 1"],
                          "passed_over": ["phone 1"]},
             "lr": {"log10_lr": None, "lr_withheld": "evidence file CHANGED since intake"}},
        ],
        "method": {
            "propositions": {"hp": "made with the reference device", "hd": "made with another device"},
            "model": {"arch": "paper", "model": "/m/paper.onnx", "architecture": "the paper's network",
                      "labels": ["phone 1", "phone 2"], "training_data_sha256": SHA,
                      "frontend": {"sample_rate": 32000, "n_mfcc": 24}, "frontend_fingerprint": SHA,
                      "onnx_sha256": SHA, "onnx_sha256_now": SHA, "contract_sha256": SHA, "checkpoint_sha256": None,
                      "precision": "fp32", "opset": 17, "matches_verdicts": False,
                      "backends_used": [{"backend": "onnxruntime", "model_sha256": SHA, "contract_sha256": SHA}]},
            "registry": {"path": "/case/registry.json", "sha256": SHA, "devices": ["phone 1", "phone 2"],
                         "embedder": {"arch": "asp", "dim": 128, "source": "/m/emb.pt", "fingerprint": SHA},
                         "note": "a registry note"},
            "scorers": [{"kind": "gsv", "arch": "gmm", "source": "/m/gsv.npz", "fingerprint": SHA}],
            "verbal_scale": [{"lr": "1-2", "support": "no support for either proposition"}],
        },
        "validation": {
            "calibration": {"method": "logistic regression", "sha256": SHA, "fitted_at": "2026-01-01",
                            "population": {"description": "15 phones", "trial_devices": ["phone 1", "phone 2"],
                                           "dataset": "ccnu", "selection": "segments 3-4"},
                            "conditions": {"codecs": ["pcm_16"], "native_rates": [32000], "duration_min": 2.0,
                                           "duration_max": 30.0, "recordings": 30},
                            "slope": 1.2345678, "offset": -0.5, "lower": -1.5, "upper": 2.6, "basis": "case registry",
                            "decision": {"rule": "bayes", "log10_threshold": 0.25, "prior": 0.5, "cost_miss": 1.0,
                                         "cost_false_alarm": 1.0}},
            "metrics": {"n_target": 30, "n_nontarget": 420, "eer": 0.05, "min_dcf": 0.1234, "cllr": 0.3,
                        "cllr_min": 0.2, "cllr_raw_scores": 0.9, "misleading_hp": 1, "misleading_hp_rate": 1 / 30,
                        "misleading_hd": 4, "misleading_hd_rate": 4 / 420, "folds": 5},
            "tippett": {"file": "calibration-tippett.png"}, "det": {"file": "calibration-det.png"},
            "condition_mismatches": [{"n": 1, "path": "/ev/a.wav", "problems": ["rate 44100 Hz", "codec mp3"],
                                      "blocks_lr": True}],
        },
        "limitations": ["one file changed after intake", "a closed-set verdict names a training device"],
    }


FIGURES = Figures({"timeline-1.png": PNG, "calibration-tippett.png": PNG, "calibration-det.png": PNG})
NOT_PRINTED = {"format", "file"}  # figure file names and the format tag are not page text


def _hostile(doc: Any, found: list[str], key: str = "") -> Any:
    """The document with every printed string replaced by a distinct hostile one (tags and both quotes);
    the replacements are appended to ``found``."""
    if isinstance(doc, dict):
        return {k: _hostile(v, found, k) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_hostile(v, found, key) for v in doc]
    if isinstance(doc, str) and key not in NOT_PRINTED:
        found.append(f"<script>alert(\"x{len(found)}\")</script><img src=x onerror='y{len(found)}'>&amp;")
        return found[-1]
    return doc


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def test_every_field_of_a_full_document_reaches_the_page() -> None:
    html = render_html(full_document(), FIGURES, json_sha256="ef" * 32)
    for text in ("42/2026", "A. Examiner", "/cases/42/state; /cases/42/compare.jsonl", "#1 a.wav", "&#9888; CHANGED",
                 "44100 &rarr; 32000 (resampled)", "pcm_16 / wav<br>bitrate 705, bandwidth 16000",
                 "judged: corrupt <span class=\"muted\">short read</span>", "(same content as /ev/b.wav)",
                 "-50.1 dBFS, peak 1.0", "LR = 31.6 (log10 LR +1.50)", "(at the ELUB bound", "(best candidate phone 2)",
                 "not given</span> evidence file CHANGED", "windows agreeing: 9 of 10", "2: phone 1, phone 2",
                 "sample_rate 32000, n_mfcc 24", "fp32 / 17", "<td>False</td>", "asp (128-d), /m/emb.pt",
                 "log10 LR = 1.235 x score + -0.5, bounded to [-1.5, 2.6] (ELUB)",
                 "bayes: a device is named when log10 LR &gt;= +0.250 (prior 0.5, C_miss 1, C_fa 1)",
                 "EER</th><td>5.00%", "1 of 30 (3.33%)", "0.900 bits", "5-fold", "rate 44100 Hz; codec mp3",
                 "no LR given", "one file changed after intake", "(SHA-256 " + "ef" * 32 + ")"):
        assert text in html, text
    assert html.count("data:image/png;base64,") == 3
    assert "Checkpoint SHA-256</th><td><span class=\"muted\">-</span>" in html


def test_a_hostile_string_is_escaped_everywhere_the_page_prints_it() -> None:
    """Every string of the document replaced by markup with both quotes: each one appears on the page
    only escaped, and the page holds no element or attribute that the template does not write."""
    hostile: list[str] = []
    doc = _hostile(copy.deepcopy(full_document()), hostile)
    html = render_html(doc, FIGURES, json_sha256='"><script>x</script>')
    assert not re.search(r"(?i)<script|<img src=x", html)  # escaped, they are text: &lt;script&gt;
    parser = _Tags()
    parser.feed(html)
    assert parser.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr",
                           "th", "td", "div", "b", "span", "br", "img", "ul", "li", "footer"}
    assert parser.attrs <= {"lang", "charset", "name", "content", "class", "alt", "src"}
    printed = [h for h in hostile if f"x{hostile.index(h)}&#34;" in html]
    # All but model.arch, which only decides that the model card is shown.
    assert len(printed) == len(hostile) - 1 and doc["method"]["model"]["arch"] not in printed
    for i in range(len(hostile)):
        assert f'"x{i}"' not in html and f"'y{i}'" not in html  # no quote of any string printed as is
    assert "&lt;script&gt;alert(&#34;x0&#34;)&lt;/script&gt;&lt;img src=x onerror=&#39;y0&#39;&gt;&amp;amp;" in html
