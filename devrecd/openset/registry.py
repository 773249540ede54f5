"""The registry of enrolled devices: one profile per device, built from reference recordings.

On disk a registry is two files side by side::

    registry.json                metadata: embedder, profiles, references (sha256, path, windows), calibration
    registry.<sha8>.npz          the arrays: per-reference embeddings of every profile

The JSON names its array file and that file's sha256, and the array file's name carries the hash,
so a registry is updated crash-safely: the new arrays are written under a new name, then the JSON
is replaced atomically (``os.replace``), then the old arrays are deleted. A reader sees either the
old registry or the new one, never a mix; a torn array file is detected by its hash.

The JSON is checked at load against its schema
(:func:`~devrecd.openset.registry_schema.registry_problems`: types, ranges,
finite numbers, unique device names, an array file beside the JSON) and carries ``content_sha256``,
the sha256 of its own content written at each save: a JSON changed outside devrecd is refused with
one line naming what is wrong, never served with a silently changed decision. Every verdict records
that hash (``open_set.registry_sha256``).

Every profile in a registry was made with ONE embedder (the same network weights, normalisation and
frontend: :attr:`Registry.embedder` holds its fingerprint); embeddings of different models live in
different spaces and cannot be compared, so enrolling or identifying with another model is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from devrecd.errors import ArtifactError, DevrecdError
from devrecd.openset.calibration import Calibration
from devrecd.openset.registry_schema import CONTENT_HASH, registry_problems
from devrecd.openset.vectors import unit
from devrecd.fsutil import atomic_write
from devrecd.provenance import utc_timestamp

log = logging.getLogger("devrecd.openset")

FORMAT = "devrecd-registry/1"
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
