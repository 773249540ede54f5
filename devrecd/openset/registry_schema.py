"""The schema of a registry's JSON (``registry.json``): what every field must be, checked before
anything of it is read (:func:`registry_problems`, :func:`validate_calibration_dict`), so that a
registry edited or damaged outside devrecd is refused naming the field, never half-used.
:mod:`devrecd.openset.registry` reads and writes the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from devrecd.openset.calibration import DECISION_RULES, Calibration
from devrecd.openset.calibration import FORMAT as CALIBRATION_FORMAT

CONTENT_HASH = "content_sha256"  # the JSON's own hash (the registry module's docstring)
_SHA256 = re.compile(r"[0-9a-f]{64}")
COSINE_KINDS = ("embedder", "gsv")  # scorers whose scores are cosines, in [-1, 1]
FUSION_SCORE_LIMIT = 1e3  # |threshold| of a fusion registry (weighted cosines plus a bias)


def _type_problem(where: str, value: Any, kind: str, *, ge: float | None = None, gt: float | None = None,
                  le: float | None = None, lt: float | None = None) -> str:
    """What is wrong with ``value`` as a ``kind`` (str, text, int, number, list, object, sha256); "" if nothing."""
    if kind in ("str", "text", "sha256"):
        if not isinstance(value, str):
            return f"{where} must be a string, got {type(value).__name__} {_short(value)}"
        if kind == "text" and not value.strip():
            return f"{where} must be a non-empty string"
        if kind == "sha256" and not _SHA256.fullmatch(value):
            return f"{where} must be a sha256 (64 lowercase hex digits), got {_short(value)}"
        return ""
    if kind == "list":
        return "" if isinstance(value, list) else f"{where} must be a list, got {type(value).__name__}"
    if kind == "object":
        return "" if isinstance(value, dict) else f"{where} must be an object, got {type(value).__name__}"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{where} must be an integer, got {type(value).__name__} {_short(value)}"
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{where} must be a number, got {type(value).__name__} {_short(value)}"
    if not math.isfinite(value):
        return f"{where} must be a finite number, got {value!r}"
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le) \
            or (lt is not None and value >= lt):
        low = f"[{ge:g}" if ge is not None else f"({gt:g}" if gt is not None else "(-inf"
        high = f"{le:g}]" if le is not None else f"{lt:g})" if lt is not None else "inf)"
        return f"{where} must be in {low}, {high}, got {value!r}"
    return ""


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# Calibration fields (devrecd.openset.calibration.Calibration, format 2): kind and bounds; the
# threshold's bounds depend on the scorer (see validate_calibration_dict).
_CALIBRATION_FIELDS: dict[str, tuple[str, dict[str, float]]] = {
    "slope": ("number", {"gt": 0}), "offset": ("number", {}), "lower": ("number", {"le": 0}),
    "upper": ("number", {"ge": 0}), "threshold": ("number", {}), "decision": ("object", {}),
    "metrics": ("object", {}), "conditions": ("object", {}), "population": ("object", {}), "scorer": ("object", {}),
    "basis": ("str", {}), "scores": ("list", {}), "labels": ("list", {}), "heldout_log10_lrs": ("list", {}),
    "open_set_log10_lrs": ("list", {}), "method": ("str", {}), "fitted_at": ("str", {}), "format": ("str", {}),
}
_DECISION_FIELDS: dict[str, tuple[str, dict[str, float]]] = {
    "rule": ("str", {}), "prior": ("number", {"gt": 0, "lt": 1}), "cost_miss": ("number", {"gt": 0}),
    "cost_false_alarm": ("number", {"gt": 0}), "far": ("number", {"ge": 0, "lt": 1}),
    "n_candidates": ("int", {"ge": 1}), "log10_threshold": ("number", {}),
}
_METRICS_RATES = ("eer", "frr", "far", "open_set_far", "misleading_hp_rate", "misleading_hd_rate")


def validate_calibration_dict(d: Any, where: str = "calibration", *, kind: str = "") -> list[str]:
    """Problems of one stored calibration (a registry's ``calibrations.<condition>``, a scorer's
    ``dev_calibrations.<condition>``): every :class:`Calibration` field without a default present,
    of its type, finite and in range; the decision's rule, prior and costs; the threshold within
    the scores ``kind``'s scorer gives; per-trial lists of one length."""
    if not isinstance(d, dict):
        return [f"{where} must be an object, got {type(d).__name__}"]
    problems = []
    required = {n for n, f in Calibration.__dataclass_fields__.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    problems += [f"{where}.{n} is missing" for n in sorted(required - set(d))]
    for key, (kind_of, bounds) in _CALIBRATION_FIELDS.items():
        if key in d and (p := _type_problem(f"{where}.{key}", d[key], kind_of, **bounds)):
            problems.append(p)
    if d.get("format", CALIBRATION_FORMAT) != CALIBRATION_FORMAT:
        problems.append(f"{where}.format must be {CALIBRATION_FORMAT!r} (fit it again), got {_short(d.get('format'))}")
    decision = d.get("decision")
    if isinstance(decision, dict):
        for key, (kind_of, bounds) in _DECISION_FIELDS.items():
            if key not in decision:
                if key != "n_candidates":  # recorded since it exists; a verdict recomputes it anyway
                    problems.append(f"{where}.decision.{key} is missing")
            elif p := _type_problem(f"{where}.decision.{key}", decision[key], kind_of, **bounds):
                problems.append(p)
        if isinstance(decision.get("rule"), str) and decision["rule"] not in DECISION_RULES:
            problems.append(f"{where}.decision.rule must be one of {', '.join(DECISION_RULES)}, "
                            f"got {_short(decision['rule'])}")
    metrics = d.get("metrics")
    if isinstance(metrics, dict):
        for key in _METRICS_RATES:
            if key in metrics and (p := _type_problem(f"{where}.metrics.{key}", metrics[key], "number", ge=0, le=1)):
                problems.append(p)
    lists = [k for k in ("scores", "labels", "heldout_log10_lrs") if isinstance(d.get(k), list)]
    if len({len(d[k]) for k in lists}) > 1:
        problems.append(f"{where}: scores, labels and heldout_log10_lrs must be of one length")
    for key in ("scores", "heldout_log10_lrs", "open_set_log10_lrs"):
        if isinstance(d.get(key), list) and any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                or not math.isfinite(v) for v in d[key]):
            problems.append(f"{where}.{key} must hold finite numbers only")
    if isinstance(d.get("threshold"), (int, float)) and not problems:
        limit = 1.0 + 1e-9 if kind in COSINE_KINDS else FUSION_SCORE_LIMIT
        if abs(d["threshold"]) > limit and not (d.get("decision") or {}).get("beyond_bounds"):
            problems.append(f"{where}.threshold must be in [-{limit:g}, {limit:g}] (the scores of a {kind or 'fusion'} "
                            f"scorer), got {d['threshold']!r}")
    return problems


def _calibrations_problems(cals: Any, where: str, kind: str) -> list[str]:
    """Problems of an object of condition -> calibration."""
    if not isinstance(cals, dict):
        return [f"{where} must be an object of condition -> calibration, got {type(cals).__name__}"]
    return [p for key, cal in cals.items() for p in validate_calibration_dict(cal, f"{where}.{key}", kind=kind)]


def registry_problems(meta: dict[str, Any]) -> list[str]:
    """Problems of a registry JSON against its schema (each names its field); [] when it is sound."""
    problems: list[str] = []

    def check(where: str, value: Any, kind: str, **bounds: float) -> bool:
        p = _type_problem(where, value, kind, **bounds)
        if p:
            problems.append(p)
        return not p

    if CONTENT_HASH in meta:
        check(CONTENT_HASH, meta[CONTENT_HASH], "sha256")
    embedder = meta.get("embedder")
    kind = ""
    if embedder is not None and check("embedder", embedder, "object"):
        for key, kind_of in (("fingerprint", "str"), ("kind", "text"), ("frontend_sha256", "str"), ("source", "str")):
            if key in embedder:
                check(f"embedder.{key}", embedder[key], kind_of)
        if "dim" in embedder and embedder["dim"] is not None:
            check("embedder.dim", embedder["dim"], "int", ge=1)
        kind = str(embedder.get("kind", "embedder")) if embedder else ""
        if embedder.get("dev_calibrations") is not None:
            problems += _calibrations_problems(embedder["dev_calibrations"], "embedder.dev_calibrations", kind)
    arrays = meta.get("arrays")
    if "arrays" not in meta:
        problems.append("arrays is missing")
    elif check("arrays", arrays, "object"):
        if "file" not in arrays:
            problems.append("arrays.file is missing")
        elif check("arrays.file", arrays["file"], "text"):
            name = arrays["file"]
            if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
                problems.append(f"arrays.file must name a file beside the registry JSON, got {_short(name)}")
        if "sha256" not in arrays:
            problems.append("arrays.sha256 is missing")
        else:
            check("arrays.sha256", arrays["sha256"], "sha256")
    profiles = meta.get("profiles")
    if "profiles" not in meta:
        problems.append("profiles is missing")
    elif check("profiles", profiles, "list"):
        seen: dict[str, int] = {}
        for i, p in enumerate(profiles):
            at = f"profiles[{i}]"
            if not check(at, p, "object"):
                continue
            if "name" not in p:
                problems.append(f"{at}.name is missing")
            elif check(f"{at}.name", p["name"], "text"):
                if p["name"] in seen:
                    problems.append(f"{at}.name {_short(p['name'])} is also profiles[{seen[p['name']]}].name: "
                                    "device names must be unique")
                seen.setdefault(p["name"], i)
            for key in ("created_at", "updated_at"):
                if key in p:
                    check(f"{at}.{key}", p[key], "str")
            refs = p.get("references")
            if "references" not in p:
                problems.append(f"{at}.references is missing")
            elif check(f"{at}.references", refs, "list"):
                for j, r in enumerate(refs):
                    rat = f"{at}.references[{j}]"
                    if not check(rat, r, "object"):
                        continue
                    for key, kind_of, bounds in (("sha256", "sha256", {}), ("path", "str", {}),
                                                 ("windows", "int", {"ge": 1}), ("seconds", "number", {"ge": 0}),
                                                 ("enrolled_at", "str", {})):
                        if key not in r:
                            problems.append(f"{rat}.{key} is missing")
                        else:
                            check(f"{rat}.{key}", r[key], kind_of, **bounds)
    if meta.get("calibrations") is not None:
        problems += _calibrations_problems(meta["calibrations"], "calibrations", kind)
    if meta.get("calibration_info") is not None:
        check("calibration_info", meta["calibration_info"], "object")
    return problems
