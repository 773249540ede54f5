"""Gather a case report: records from the daemon's state, run outputs or files; re-verify; measure.

:func:`build_report` returns the report document (plain data, validated by ``schema.json``) and
the PNG figures it refers to by file name. Every evidence file is hashed again at report time
(read-only) and compared with the hash recorded at intake; a file that changed is marked and its
verdict is said not to apply to the present content.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from devrecd import __version__
from devrecd.config import Config
from devrecd.errors import ConfigError, DevrecdError
from devrecd.report.sources import ReportError, gather

REPORT_FORMAT = "devrecd-report/1"
# Level flags of a recording (measured on the decoded samples at report time).
LOW_LEVEL_DBFS = -45.0  # RMS below this: the device's trace is near the noise floor


@dataclass
class Figures:
    """PNG figures of a report, by file name."""

    files: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, png: bytes) -> dict[str, str]:
        import hashlib

        self.files[name] = png
        return {"file": name, "sha256": hashlib.sha256(png).hexdigest()}


# --- evidence --------------------------------------------------------------------------------

def verify(path: str, recorded: str | None) -> dict[str, Any]:
    """Hash the file again (read-only) and compare with the hash recorded at intake."""
    from devrecd.audio import sha256_file

    try:
        now = sha256_file(path)
        size = os.stat(path).st_size
    except FileNotFoundError:
        return {"status": "missing", "sha256_now": None, "size_now": None}
    except OSError as exc:
        return {"status": "unreadable", "sha256_now": None, "size_now": None, "detail": exc.strerror or str(exc)}
    if not recorded:
        status = "no hash recorded"
    else:
        status = "verified" if now == recorded else "CHANGED since intake"
    return {"status": status, "sha256_now": now, "size_now": size}


def levels(rec: dict[str, Any], path: str, cfg: Config) -> dict[str, Any] | None:
    """The recording's levels block as the one meter (:mod:`devrecd.audio.levels`) measured it at
    intake (the verdict's ``levels``), or measured now for a recording without one; plus the report's
    own ``low_level`` flag (the device's trace near the noise floor)."""
    lv = rec.get("levels")
    if lv is None:
        from devrecd.audio import AudioError, read_evidence

        try:
            lv = read_evidence(path, cfg.frontend.sample_rate, cfg.audio).levels
        except AudioError:
            return None
    if lv is None:
        return None
    lv = dict(lv)
    if lv.get("rms_dbfs") is not None and lv["rms_dbfs"] < LOW_LEVEL_DBFS:
        lv["flags"] = [*lv.get("flags", []), "low_level"]
    return lv


def inventory_entry(rec: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """One evidence file: what was recorded at intake, re-verified now."""
    path = str(rec.get("path") or "")
    check = verify(path, rec.get("sha256")) if path else {"status": "missing", "sha256_now": None, "size_now": None}
    entry = {
        "path": path, "size": rec.get("size"), "sha256": rec.get("sha256"), "integrity": check,
        "outcome": rec.get("outcome", "not judged"), "reason": rec.get("reason"), "detail": rec.get("detail"),
    }
    for key in ("duration", "sample_rate", "native_rate", "channels", "codec", "container", "decoder", "resampled",
                "bitrate", "bandwidth", "condition", "judged_at", "compared_at", "duplicate_of_path"):
        if rec.get(key) is not None:
            entry[key] = rec[key]
    stream = rec.get("integrity")
    if isinstance(stream, dict):  # the intake's findings on the file's structure (md5_mismatch, truncated, ...)
        check["flags"] = list(stream.get("flags") or [])
        check["notes"] = list(stream.get("notes") or [])
    if check["status"] in ("verified", "no hash recorded"):
        lv = levels(rec, path, cfg)
        if lv is not None:
            entry["levels"] = lv
    return entry


def describe_loose(path: str, cfg: Config) -> dict[str, Any]:
    """A file named for the report without any verdict: decode it to describe it (not judged)."""
    from devrecd.audio import AudioError, read_evidence, sha256_file

    try:
        rec = read_evidence(path, cfg.frontend.sample_rate, cfg.audio).describe()
        return {**rec, "outcome": "not judged"}
    except AudioError as exc:
        try:
            sha = sha256_file(path)
        except OSError:
            sha = None
        return {"path": path, "sha256": sha, "outcome": "not judged", "reason": exc.reason, "detail": exc.detail}


# --- the report ------------------------------------------------------------------------------

def _registry_calibrations(path: str | None):
    """The calibrations of a registry by condition (its case calibrations over its scorer's
    development ones) and its identity (``({}, None)`` without a registry)."""
    if not path:
        return {}, None
    from devrecd.openset.registry import open_registry
    from devrecd.openset.scoring import development_calibrations

    reg = open_registry(path)
    info = {"path": str(reg.path), "sha256": _sha(reg.path), "embedder": reg.embedder, "devices": reg.names,
            "calibrated_at": reg.calibration_info.get("calibrated_at")}
    return {**development_calibrations(reg), **reg.calibrations}, info


def _sha(path: str | os.PathLike) -> str | None:
    from devrecd.audio import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def model_card(model: str | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The model's card from its contract (architecture, training data hash, frontend, hashes)."""
    used = sorted({(r.get("backend"), r.get("model_sha256"), r.get("contract_sha256")) for r in records
                   if r.get("outcome") in ("judged", "duplicate") and r.get("model_sha256")}, key=str)
    card: dict[str, Any] = {"backends_used": [{"backend": b, "model_sha256": m, "contract_sha256": c} for b, m, c in used]}
    if not model:
        card["note"] = "no model contract given (--model): only the hashes recorded with the verdicts are shown"
        return card
    from devrecd.contract import contract_path_for, load_for_onnx

    c = load_for_onnx(model, verify=False)
    card.update({
        "model": str(model), "name": c.name, "arch": c.arch, "precision": c.precision, "opset": c.opset,
        "labels": list(c.labels), "onnx_sha256": c.onnx_sha256, "onnx_sha256_now": _sha(model),
        "contract_sha256": _sha(contract_path_for(model)), "checkpoint_sha256": c.checkpoint_sha256,
        "training_data_sha256": c.dataset_sha256, "frontend": c.frontend.to_dict(), "frontend_fingerprint": c.frontend_fingerprint, "parity": c.parity,
        "versions": c.versions, "created": c.created,
        "architecture": ("the paper's network: 73-dim MFCC/logE/deltas/pre-Fbank features -> ConvLSTM1D -> BiLSTM "
                         "-> Transformer encoder -> softmax over the training devices") if c.arch == "paper" else c.arch,
    })
    card["matches_verdicts"] = all(u["model_sha256"] == c.onnx_sha256 for u in card["backends_used"])
    return card


def build_report(sources: Sequence[str | os.PathLike], cfg: Config, *, case: dict[str, str] | None = None,
                 model: str | None = None, registry: str | None = None, calibration: str | None = None
                 ) -> tuple[dict[str, Any], Figures]:
    """The report document and its figures (see the module docstring)."""
    from devrecd.forensic.lr import condition_mismatch, load_calibration
    from devrecd.forensic.plots import calibration_plots

    if not sources:
        raise ConfigError("nothing to report on: give a state folder, a run output (.jsonl) or recordings")
    records, loose = gather(sources, cfg)
    records += [describe_loose(p, cfg) for p in loose]
    if not records:
        raise ReportError("the sources hold no verdicts and no recordings")
    figures = Figures()

    # The registry (open-set verdicts name theirs) and the LR calibration that goes with it.
    reg_path = registry or next((r["open_set"]["registry"] for r in records if isinstance(r.get("open_set"), dict)
                                 and r["open_set"].get("registry")), None) or (cfg.registry.path or None)
    cals, reg_info = {}, None
    try:
        cals, reg_info = _registry_calibrations(reg_path)
    except DevrecdError as exc:
        reg_info = {"path": reg_path, "error": str(exc)}
    # The calibration the report validates: --calibration FILE, else the one most verdicts cite.
    cited = [r["open_set"].get("condition") for r in records if isinstance(r.get("open_set"), dict)]
    key = max(set(c for c in cited if c in cals), key=cited.count, default="clean" if "clean" in cals else None)
    lr_cal = load_calibration(calibration) if calibration else cals.get(key) if key else None
    if lr_cal is not None and not calibration and reg_info and reg_info.get("devices"):
        # The decision as the verdicts took it: the configured rule among the registry's devices.
        from devrecd.openset.calibration import Decision

        lr_cal = lr_cal.with_decision(Decision.from_config(cfg.registry), n_candidates=len(reg_info["devices"]))
    compared = [r for r in records if r.get("outcome") == "compared"]
    if lr_cal is None and compared and compared[0].get("calibration"):
        reg_info = reg_info or {}
        reg_info["note"] = "the comparisons cite calibration " + compared[0]["calibration"]["sha256"][:12] + \
                           "; give --calibration FILE to show its validation"

    inventory, recordings = [], []
    for i, rec in enumerate(records):
        entry = inventory_entry(rec, cfg)
        entry["n"] = i + 1
        inventory.append(entry)
        if rec.get("outcome") in ("judged", "duplicate", "compared"):
            recordings.append(_recording_section(i + 1, rec, entry, lr_cal if calibration else cals, figures))

    validation = None
    if lr_cal is not None:
        plots = {name: figures.add(f"calibration-{name}", png) for name, png in calibration_plots(lr_cal).items()}
        mismatches = []
        for e, rec in zip(inventory, records):  # the inventory is built one entry per record
            if e["outcome"] in ("judged", "duplicate", "compared"):
                # With the record's comparison: a noise-matched comparison below the calibration's SNRs blocks
                # (condition_mismatch), as it does for the recording's own LR (_recording_section).
                block, warn = condition_mismatch({**e, "comparison": rec.get("comparison")}, lr_cal.conditions)
                if block or warn:
                    mismatches.append({"n": e["n"], "path": e["path"], "problems": block + warn, "blocks_lr": bool(block)})
        validation = {"calibration": lr_cal.summary(), "metrics": lr_cal.metrics, "tippett": plots["tippett.png"],
                      "det": plots["det.png"], "condition_mismatches": mismatches}

    case = case or {}
    doc = {
        "format": REPORT_FORMAT,
        "case": {"case_id": case.get("case_id") or cfg.report.case_id, "examiner": case.get("examiner") or cfg.report.examiner,
                 "laboratory": case.get("laboratory") or cfg.report.laboratory,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "software_version": __version__, "host": socket.gethostname(),
                 "platform": f"{platform.system()} {platform.release()} ({platform.machine()}), Python {platform.python_version()}",
                 "sources": [str(Path(s).resolve()) for s in sources]},
        "summary": _summary(inventory),
        "inventory": inventory,
        "recordings": recordings,
        "method": {"model": model_card(model, records), "registry": reg_info,
                   "scorers": _unique([r["scorer"] for r in compared if r.get("scorer")]),
                   "propositions": {"hp": _hp(), "hd": _hd()}, "verbal_scale": _scale()},
        "validation": validation,
    }
    doc["limitations"] = limitations(doc, lr_cal)
    return doc, figures


def _unique(items: list[dict]) -> list[dict]:
    out: list[dict] = []
    for it in items:
        if it not in out:
            out.append(it)
    return out


def _hp() -> str:
    from devrecd.forensic.lr import HP

    return HP


def _hd() -> str:
    from devrecd.forensic.lr import HD

    return HD


def _scale() -> list[dict[str, str]]:
    from devrecd.forensic.verbal import scale_rows

    return scale_rows()


def _summary(inventory: list[dict]) -> dict[str, int]:
    out = {"files": len(inventory), "judged": 0, "compared": 0, "duplicate": 0, "failed": 0, "not_judged": 0,
           "changed": 0, "missing": 0}
    for e in inventory:
        out[e["outcome"].replace(" ", "_")] = out.get(e["outcome"].replace(" ", "_"), 0) + 1
        if e["integrity"]["status"] == "CHANGED since intake":
            out["changed"] += 1
        elif e["integrity"]["status"] == "missing":
            out["missing"] += 1
    return out


def _recording_section(n: int, rec: dict[str, Any], entry: dict[str, Any], lr_cal, figures: Figures) -> dict[str, Any]:
    """Verdict, candidates, LR, timeline and flags of one judged or compared recording."""
    from devrecd.forensic.lr import assess
    from devrecd.forensic.plots import timeline_png

    sec: dict[str, Any] = {"n": n, "path": entry["path"], "outcome": rec["outcome"], "sha256": rec.get("sha256"),
                           "integrity": entry["integrity"]["status"],
                           "flags": [*(entry.get("levels") or {}).get("flags", []), *entry["integrity"].get("flags", [])]}
    if rec["outcome"] == "compared":
        sec["comparison"] = {k: rec.get(k) for k in ("reference_device", "reference_source", "score", "log10_lr",
                                                     "log10_lr_unbounded", "lr", "bounded", "verbal", "lr_withheld",
                                                     "condition_warnings")}
        sec["comparison"]["references"] = [{"path": f.get("path"), "sha256": f.get("sha256")} for f in rec.get("references", [])]
        sec["comparison"]["calibration_sha256"] = (rec.get("calibration") or {}).get("sha256")
        if rec.get("window_scores"):
            sec["timeline"] = figures.add(f"timeline-{n}.png", timeline_png(
                rec["window_starts"], rec["window_scores"], ylabel="cosine to references",
                title=f"#{n} per-window score against {rec.get('reference_device')}"))
        return sec
    if not ("closed_set" in rec and rec["closed_set"] is None):  # None: served open set only, no closed-set model
        closed = rec.get("closed_set") or {k: rec.get(k) for k in ("device", "score", "top_k")}
        sec["closed_set"] = {"device": closed.get("device"), "score": closed.get("score"), "top_k": closed.get("top_k") or []}
    if isinstance(rec.get("open_set"), dict):
        o = rec["open_set"]
        sec["open_set"] = {"device": rec.get("device"), "candidate": rec.get("candidate"), "score": rec.get("score"),
                           "accepted": o.get("accepted"), "threshold": o.get("threshold"),
                           "log10_threshold": o.get("log10_threshold"), "rule": o.get("rule"),
                           "condition": o.get("condition"), "calibration_source": o.get("calibration_source"),
                           "top_k": rec.get("top_k") or [],
                           # candidates whose calibration could not decide (per-candidate conditions)
                           **{k: o[k] for k in ("passed_over", "undecided") if o.get(k)}}
        # The LR for the best candidate, from the calibration of the same scorer and condition (never from a raw score).
        ident = {"fingerprint": o.get("embedder")}
        cal = lr_cal.get(o.get("condition")) if isinstance(lr_cal, dict) else lr_cal
        if rec["outcome"] == "judged" and entry["integrity"]["status"] in ("verified", "no hash recorded"):
            sec["lr"] = {"reference_device": rec.get("candidate"), **assess(cal, float(rec.get("score") or 0.0),
                                                                          {**entry, "comparison": rec.get("comparison")}, ident)}
        elif entry["integrity"]["status"] not in ("verified", "no hash recorded"):
            sec["lr"] = {"reference_device": rec.get("candidate"), "log10_lr": None, "lr": None, "verbal": None,
                         "lr_withheld": f"evidence file {entry['integrity']['status']}"}
    windows = rec.get("windows") or []
    if windows:
        label = closed.get("device")
        sec["timeline"] = figures.add(f"timeline-{n}.png", timeline_png(
            [w["start"] for w in windows], [w["score"] for w in windows], agree=[w["device"] == label for w in windows],
            ylabel="window probability", title=f"#{n} per-window closed-set score (best device per window)"))
        sec["windows_agreeing"] = f"{sum(w['device'] == label for w in windows)}/{len(windows)}"
    return sec


def limitations(doc: dict[str, Any], lr_cal) -> list[str]:
    """Plain statements of what the measurements do and do not support."""
    out = []
    s = doc["summary"]
    if s["changed"]:
        out.append(f"{s['changed']} evidence file(s) changed after intake (SHA-256 differs): their verdicts describe the "
                   "content as it was at intake, not the present file; no LR is given for them.")
    if s["missing"]:
        out.append(f"{s['missing']} evidence file(s) could not be found at report time; their hashes could not be re-verified.")
    if s["failed"]:
        out.append(f"{s['failed']} file(s) could not be analysed (reasons in the inventory); nothing is concluded about them.")
    if lr_cal is None:
        out.append("No likelihood-ratio calibration was available: scores are reported as scores, which are not "
                   "likelihood ratios, and no LR or verbal equivalent is given.")
    else:
        m = lr_cal.metrics
        pop = lr_cal.population
        out.append(f"The likelihood ratios rest on {m['n_target']} same-device and {m['n_nontarget']} different-device "
                   f"development trials ({pop.get('description', '')}). They are capped at log10 LR "
                   f"{lr_cal.lower:g} to {lr_cal.upper:g} (ELUB): the data support no stronger statement in either direction.")
        out.append(f"The relevant population is {len(pop.get('trial_devices', []))} devices "
                   f"({', '.join(pop.get('trial_devices', [])[:8])}{', ...' if len(pop.get('trial_devices', [])) > 8 else ''}); "
                   "devices of other makes, models or units were not part of it, and the LRs say nothing about how "
                   "such devices would score.")
        out.append(f"On held-out development trials, {m['misleading_hp_rate']:.1%} of same-device trials gave an LR below 1 "
                   f"and {m['misleading_hd_rate']:.1%} of different-device trials an LR above 1 (misleading evidence); "
                   f"EER {m['eer']:.1%}, Cllr {m['cllr']:.3f} bits (Cllr_min {m['cllr_min']:.3f}).")
        c = lr_cal.conditions
        out.append(f"The calibration recordings were {', '.join(c.get('codecs') or ['?'])} at "
                   f"{', '.join(str(r) for r in c.get('native_rates') or ['?'])} Hz, "
                   f"{c.get('duration_min')}-{c.get('duration_max')} s long; other conditions are not covered.")
        mism = (doc.get("validation") or {}).get("condition_mismatches") or []
        if mism:
            blocked = sum(x["blocks_lr"] for x in mism)
            out.append(f"{len(mism)} case recording(s) differ from the calibration conditions"
                       + (f"; for {blocked} of them no LR is given" if blocked else "") + " (see Validation).")
    resampled = sum(1 for e in doc["inventory"] if e.get("resampled"))
    if resampled:
        out.append(f"{resampled} recording(s) were resampled to the model's rate before analysis (high-quality soxr); "
                   "resampling alters the channel the analysis relies on.")
    flagged = [e for e in doc["inventory"] if (e.get("levels") or {}).get("flags")]
    if flagged:
        out.append(f"{len(flagged)} recording(s) carry level flags (low level, clipping or DC offset) that can mask "
                   "or imitate device traces.")
    damaged = [e for e in doc["inventory"] if e["integrity"].get("flags")]
    if damaged:
        out.append(f"{len(damaged)} recording(s) carry integrity flags (MD5 mismatch, truncation or a header length "
                   "that the audio does not fill): the audio judged is not the audio the file's own header describes.")
    if any("closed_set" in r and "open_set" not in r for r in doc["recordings"]):
        labels = (doc["method"]["model"].get("labels") or [])
        out.append("Closed-set verdicts name one of the model's training devices"
                   + (f" ({len(labels)})" if labels else "")
                   + ": they cannot say 'none of these'; a closed-set score is not a likelihood ratio.")
    out.append("Verdicts are statements about the recording device given the recordings examined; they do not "
               "establish who made a recording, when, or whether it was edited.")
    return out
