"""The registry of enrolled devices: one profile per device, built from reference recordings.

On disk a registry is two files side by side::

    registry.json                metadata: embedder, profiles, references (sha256, path, windows), calibration
    registry.<sha8>.npz          the arrays: per-reference embeddings of every profile

The JSON names its array file and that file's sha256, and the array file's name carries the hash,
so a registry is updated crash-safely: the new arrays are written under a new name, then the JSON
is replaced atomically (``os.replace``), then the old arrays are deleted. A reader sees either the
old registry or the new one, never a mix; a torn array file is detected by its hash.

The JSON is checked at load against the schema below (:func:`registry_problems`: types, ranges,
finite numbers, unique device names, an array file beside the JSON) and carries ``content_sha256``,
the sha256 of its own content written at each save: a JSON changed outside devrecd is refused with
one line naming what is wrong, never served with a silently changed decision. Every verdict records
that hash (``open_set.registry_sha256``).

Every profile in a registry was made with ONE embedder (the same network weights, normalisation and
frontend: :attr:`Registry.embedder` holds its fingerprint); embeddings of different models live in
different spaces and cannot be compared, so enrolling or identifying with another model is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from devrecd.errors import ArtifactError, DevrecdError
from devrecd.openset.calibration import Calibration
from devrecd.openset.vectors import unit
from devrecd.fsutil import atomic_write
from devrecd.provenance import utc_timestamp

log = logging.getLogger("devrecd.openset")

FORMAT = "devrecd-registry/1"
CONTENT_HASH = "content_sha256"  # the JSON's own hash (module docstring)
SCORER_PREFIX = "scorer__"  # array-file keys of the scorer's parameters (profiles are p0, p1, ...)


class RegistryError(DevrecdError):
    """A registry operation that cannot be done as asked (unknown device, wrong model, ...)."""

    reason = "registry"


def recording_embedding(window_embeddings: np.ndarray) -> np.ndarray:
    """One recording's embedding: the unit-length mean of its unit-length window embeddings."""
    w = np.asarray(window_embeddings, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] == 0:
        raise RegistryError(f"expected (windows > 0, dim) embeddings, got shape {w.shape}")
    return unit(unit(w).mean(axis=0))


@dataclass(frozen=True)
class Reference:
    """One reference recording of a profile."""

    sha256: str
    path: str  # as given at enrolment (for the report; the sha256 is what identifies it)
    windows: int  # windows the embedding was averaged over
    seconds: float  # duration of the recording
    enrolled_at: str

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "path": self.path, "windows": self.windows,
                "seconds": round(self.seconds, 3), "enrolled_at": self.enrolled_at}


@dataclass
class DeviceProfile:
    """A device: its references and their (unit-length) recording embeddings."""

    name: str
    references: list[Reference] = field(default_factory=list)
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (n_refs, dim), rows unit length
    created_at: str = ""
    updated_at: str = ""

    @property
    def mean(self) -> np.ndarray:
        """The profile's embedding: unit-length mean of its reference embeddings."""
        return unit(self.embeddings.mean(axis=0))

    @property
    def counts(self) -> dict[str, float]:
        return {"n_references": len(self.references), "windows": sum(r.windows for r in self.references),
                "seconds": round(sum(r.seconds for r in self.references), 3)}

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view (without the arrays)."""
        return {"name": self.name, **self.counts, "created_at": self.created_at, "updated_at": self.updated_at,
                "references": [r.to_dict() for r in self.references]}


@dataclass
class Registry:
    """Enrolled device profiles plus the embedder they were made with and an optional calibration."""

    path: Path  # the JSON file
    embedder: dict[str, Any] = field(default_factory=dict)  # fingerprint, arch, dim, frontend sha256, source
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    # The case calibrations (devrecd calibrate), one per comparison condition ("clean", "amrnb",
    # "clean/short", ...), and what they were fitted on.
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    calibration_info: dict[str, Any] = field(default_factory=dict)
    # The scorer's own parameters (a GSV scorer's UBM and NAP basis: see devrecd.openset.scorers),
    # stored in the array file with the profiles so that the registry carries what it was made with.
    scorer_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    content_sha256: str = ""  # of the JSON as loaded or last saved (every verdict records it)

    # --- queries ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.profiles)

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """Profile names (sorted) and their mean embeddings stacked as (n_profiles, dim)."""
        names = self.names
        if not names:
            raise RegistryError(f"registry {self.path} has no enrolled devices; run `devrecd enroll` first")
        return names, np.stack([self.profiles[n].mean for n in names])

    def get(self, name: str) -> DeviceProfile:
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(self.names) or "none"
            raise RegistryError(f"no device {name!r} in {self.path} (enrolled: {known})", reason="unknown_profile") from None

    @property
    def kind(self) -> str:
        """The scorer kind the profiles were made with (``embedder`` for registries that predate kinds)."""
        return str(self.embedder.get("kind", "embedder")) if self.embedder else ""

    def check_embedder(self, embedder: dict[str, Any]) -> None:
        """Refuse vectors from another scorer than the one this registry was built with: another
        fingerprint, or (where both record them) another frontend or embedding dimension — an export's
        contract declares its frontend, and features of another frontend would be scored silently."""
        if not self.embedder:
            return
        for key, what in (("frontend_sha256", "frontend"), ("dim", "embedding dimension")):
            mine, theirs = self.embedder.get(key), embedder.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise RegistryError(
                    f"registry {self.path} was enrolled with a model of another {what} ({str(mine)[:12]}) than "
                    f"{embedder.get('source', '?')} ({str(theirs)[:12]}): its profiles cannot be compared with "
                    "this model's vectors", reason="model_mismatch")
        if self.embedder.get("fingerprint") != embedder.get("fingerprint"):
            raise RegistryError(
                f"registry {self.path} was enrolled with model {self.embedder.get('fingerprint', '?')[:12]} "
                f"({self.embedder.get('source', '?')}); this model is {embedder.get('fingerprint', '?')[:12]} "
                f"({embedder.get('source', '?')}). Embeddings of different models cannot be compared: "
                "enrol again into a new registry with this model", reason="model_mismatch")

    # --- updates ----------------------------------------------------------------------------
    def enroll(self, name: str, embedder: dict[str, Any], refs: Iterable[tuple[Reference, np.ndarray]]) -> tuple[int, int]:
        """Add references (each with its window embeddings) to device ``name``, creating it if new.

        A reference whose sha256 the profile already holds is skipped (enrolling the same file
        twice must not weigh it double). Returns (added, skipped). Invalidates the calibration,
        whose threshold was measured against the old profiles.
        """
        name = name.strip()
        if not name:
            raise RegistryError("a device name must not be empty")
        self.check_embedder(embedder)
        now = utc_timestamp()
        profile = self.profiles.get(name) or DeviceProfile(name=name, created_at=now)
        have = {r.sha256 for r in profile.references}
        rows = [profile.embeddings] if profile.references else []
        added = skipped = 0
        for ref, window_emb in refs:
            if ref.sha256 in have:
                skipped += 1
                continue
            # (windows, dim) window embeddings, or a scorer's (dim,) recording vector
            emb = recording_embedding(window_emb) if np.ndim(window_emb) == 2 else unit(window_emb)
            if embedder.get("dim") not in (None, emb.shape[0]):
                raise RegistryError(f"embedding has {emb.shape[0]} dims, the embedder says {embedder['dim']}")
            have.add(ref.sha256)
            profile.references.append(ref)
            rows.append(emb[None, :])
            added += 1
        if added:
            profile.embeddings = np.concatenate(rows).astype(np.float32)
            profile.updated_at = now
            self.profiles[name] = profile
            if not self.embedder:
                self.embedder = dict(embedder)
            self.calibrations = {}
            self.calibration_info = {}
        return added, skipped

    def remove(self, name: str) -> DeviceProfile:
        """Delete a profile (and the calibration, which no longer describes this registry)."""
        profile = self.get(name)
        del self.profiles[name]
        self.calibrations = {}
        self.calibration_info = {}
        return profile

    def set_calibrations(self, cals: dict[str, Calibration], info: dict[str, Any]) -> None:
        """Replace the case calibrations (every condition at once: they describe one set of profiles)."""
        self.calibrations = dict(cals)
        self.calibration_info = dict(info)

    # --- persistence ------------------------------------------------------------------------
    def to_json(self, arrays_name: str, arrays_sha256: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "embedder": self.embedder,
            "arrays": {"file": arrays_name, "sha256": arrays_sha256},
            "profiles": [self.profiles[n].summary() for n in self.names],
            "calibrations": {k: c.to_dict() for k, c in sorted(self.calibrations.items())},
            "calibration_info": self.calibration_info,
        }

    def save(self) -> None:
        """Write the registry crash-safely (see the module docstring)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{f"p{i}": self.profiles[n].embeddings.astype(np.float32) for i, n in enumerate(self.names)},
                 **{f"{SCORER_PREFIX}{k}": v for k, v in self.scorer_arrays.items()})
        blob = buf.getvalue()
        digest = hashlib.sha256(blob).hexdigest()
        arrays = self.path.with_name(f"{self.path.stem}.{digest[:8]}.npz")
        old = _arrays_file(self.path)
        _write_atomic(arrays, blob)
        meta = self.to_json(arrays.name, digest)
        self.content_sha256 = meta[CONTENT_HASH] = content_hash(meta)
        _write_atomic(self.path, json.dumps(meta, indent=2).encode())
        if old is not None and old != arrays:
            old.unlink(missing_ok=True)


def open_registry(path: str | os.PathLike, *, create: bool = False) -> Registry:
    """Load the registry at ``path`` (a JSON file); with ``create``, a missing one starts empty."""
    path = Path(path).expanduser()
    if not path.exists():
        if create:
            return Registry(path=path)
        raise RegistryError(f"no registry at {path} (enrol a device first: devrecd enroll ...)", reason="no_registry")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"registry {path} is unreadable: {exc}") from None
    except RecursionError:
        raise ArtifactError(f"registry {path} is unreadable: nested too deeply to be a registry") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a devrecd registry (format {FORMAT!r} expected)")
    digest = content_hash(meta)
    if CONTENT_HASH in meta and meta[CONTENT_HASH] != digest:
        raise ArtifactError(f"registry {path}: {CONTENT_HASH} does not match its content: the JSON was changed "
                            "outside devrecd (enrol or calibrate again to make a registry)")
    problems = registry_problems(meta)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ArtifactError(f"registry {path}: {problems[0]}{more}")
    arrays_path = path.with_name(meta["arrays"]["file"])
    try:
        blob = arrays_path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"registry {path}: its array file is missing ({exc.strerror or exc})") from None
    if hashlib.sha256(blob).hexdigest() != meta["arrays"]["sha256"]:
        raise ArtifactError(f"registry {path}: {arrays_path.name} does not match its recorded sha256 (damaged)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            reg = Registry(path=path, embedder=dict(meta.get("embedder") or {}), content_sha256=digest)
            for i, p in enumerate(meta["profiles"]):
                refs = [Reference(sha256=r["sha256"], path=r["path"], windows=int(r["windows"]),
                                  seconds=float(r["seconds"]), enrolled_at=r["enrolled_at"]) for r in p["references"]]
                emb = np.asarray(npz[f"p{i}"], dtype=np.float32)
                if emb.shape[0] != len(refs):
                    raise ArtifactError(f"registry {path}: profile {p['name']!r} has {len(refs)} references "
                                        f"but {emb.shape[0]} embeddings")
                reg.profiles[p["name"]] = DeviceProfile(name=p["name"], references=refs, embeddings=emb,
                                                        created_at=p.get("created_at", ""),
                                                        updated_at=p.get("updated_at", ""))
            reg.scorer_arrays = {k[len(SCORER_PREFIX):]: np.asarray(npz[k]) for k in npz.files
                                 if k.startswith(SCORER_PREFIX)}
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"registry {path} is malformed: {exc!r}") from None
    if meta.get("calibration"):
        # Version 1 (natural-log LLR and a FAR threshold, before one calibration of log10 LRs): its
        # numbers mean something else; the registry is served on its scorer's development
        # calibrations until `devrecd calibrate` is run again.
        log.warning("registry calibration of an earlier format ignored: run `devrecd calibrate` again",
                    extra={"registry": str(path)})
    cals = meta.get("calibrations") or {}
    if not isinstance(cals, dict):
        raise ArtifactError(f"registry {path}: 'calibrations' must be an object of condition -> calibration",
                            reason="registry_format")
    try:
        reg.calibrations = {str(k): Calibration.from_dict(v) for k, v in cals.items()}
    except ArtifactError as exc:
        raise ArtifactError(f"registry {path}: calibrations: {exc}", reason="registry_format") from None
    reg.calibration_info = dict(meta.get("calibration_info") or {})
    return reg


def content_hash(meta: dict[str, Any]) -> str:
    """sha256 of a registry JSON's content (canonical form, its own ``content_sha256`` left out)."""
    body = {k: v for k, v in meta.items() if k != CONTENT_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                     allow_nan=True).encode()).hexdigest()


# --- the schema of registry.json ---------------------------------------------------------------

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
    from devrecd.openset.calibration import DECISION_RULES, FORMAT as CALIBRATION_FORMAT

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


def _arrays_file(json_path: Path) -> Path | None:
    """The array file the registry JSON at ``json_path`` names, when it is one that :meth:`Registry.save`
    wrote (``<stem>.<sha8>.npz`` beside the JSON): save() deletes it, so a hand-edited name never is."""
    try:
        name = json.loads(json_path.read_text(encoding="utf-8"))["arrays"]["file"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # no previous registry (or an unreadable one, which save() replaces)
    if not isinstance(name, str) or not re.fullmatch(re.escape(json_path.stem) + r"\.[0-9a-f]{8}\.npz", name):
        return None
    return json_path.with_name(name)


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, data)
