"""``devrecd install-service``: put the systemd unit, its sysusers/tmpfiles snippets and a default
``/etc/devrecd/config.toml`` in place, under ``/`` or a staging root (packaging, tests).

The files are package data (:mod:`devrecd.service_files`: the checkout's ``systemd/*``,
``config.toml`` and ``docs/operations.md``, inside every wheel), or with ``--source`` a source
checkout's own; the installer only adapts them to this machine (where the ``devrecd`` executable lives, which folders are evidence) and never
overwrites what an operator already edited (the config and env file) unless asked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Iterable, Sequence

from devrecd.config import load_config
from devrecd.errors import DevrecdError
from devrecd.fsutil import atomic_write

UNIT_NAME = "devrecd.service"
CONFIG_PATH = Path("/etc/devrecd/config.toml")
ENV_PATH = Path("/etc/devrecd/devrecd.env")
STATE_ROOT = Path("/var/lib/devrecd")
DEFAULT_EVIDENCE = ("/srv/evidence",)

# Source file in the checkout -> installed path (absolute, re-rooted under --prefix).
UNIT_DEST = Path("/etc/systemd/system") / UNIT_NAME
SYSUSERS_DEST = Path("/etc/sysusers.d/devrecd.conf")
TMPFILES_DEST = Path("/etc/tmpfiles.d/devrecd.conf")
DOC_DEST = Path("/usr/share/doc/devrecd/operations.md")

# Values of the installed config.toml that differ from the repository defaults: state and engines
# live in the service's StateDirectory, never relative to a working directory.
SERVICE_SETTINGS: dict[tuple[str, str], Any] = {
    ("watch", "state_dir"): str(STATE_ROOT / "state"),
    ("backend", "engine_dir"): str(STATE_ROOT / "engine"),
    ("train", "cache_dir"): "/var/cache/devrecd/features",
}


class InstallError(DevrecdError):
    """The service cannot be installed as asked."""

    reason = "install"


@dataclass(frozen=True)
class Step:
    """One file the installer writes (or leaves alone)."""

    dest: Path  # absolute path on the target system (before re-rooting)
    content: bytes
    mode: int
    keep_existing: bool = False  # operator-owned files (config, env): never replaced without --force


@dataclass
class Plan:
    """What an install does, computed without touching the target."""

    root: Path
    steps: list[Step]
    exec_start: str
    notes: list[str] = field(default_factory=list)

    def target(self, step: Step) -> Path:
        """Where ``step`` lands under :attr:`root`."""
        return self.root / step.dest.relative_to("/")

    def describe(self, force: bool = False) -> list[str]:
        """One line per step: ``write``/``replace``/``keep`` and the path."""
        lines = []
        for s in self.steps:
            t = self.target(s)
            verb = "write" if not t.exists() else ("keep" if s.keep_existing and not force else "replace")
            lines.append(f"{verb:8s}{t}  (mode {s.mode:o})")
        return lines


# --- rendering -------------------------------------------------------------------------------------

def toml_literal(value: Any) -> str:
    """A TOML literal for a str, bool, int, float or a list of those (JSON strings are TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise InstallError(f"cannot write {value!r} as a TOML value", reason="install_value")


_SECTION = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
_KEY = re.compile(r"^(\s*)([A-Za-z0-9_-]+)(\s*=\s*)(.*)$")


def _split_value(rest: str) -> tuple[str, str]:
    """``value   # comment`` -> (value, ``   # comment``); a ``#`` inside a string is not a comment."""
    for m in re.finditer("#", rest):
        head = rest[: m.start()]
        try:
            tomllib.loads("v = " + head)
        except tomllib.TOMLDecodeError:
            continue
        value = head.rstrip()
        return value, rest[len(value):]
    return rest.rstrip(), ""


def set_toml_values(text: str, values: dict[tuple[str, str], Any]) -> str:
    """Change ``[section] key = ...`` lines in a commented TOML file, keeping comments and layout.

    Every key must already be in the text (the shipped config lists them all): a missing one is an
    error rather than a silently ignored setting.
    """
    out, section, done = [], None, set()
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        sec = _SECTION.match(body)
        if sec:
            section = sec.group(1)
        key = _KEY.match(body) if section is not None and not body.lstrip().startswith("#") else None
        if key and (section, key.group(2)) in values:
            indent, name, eq, rest = key.groups()
            old, comment = _split_value(rest)
            new = toml_literal(values[(section, name)])
            # Keep the comment's column when the new value fits, as the shipped file aligns them.
            if comment:
                comment = " " * max(1, len(old) + len(comment) - len(comment.lstrip()) - len(new)) + comment.lstrip()
            body = f"{indent}{name}{eq}{new}{comment}"
            done.add((section, name))
        out.append(body + ending)
    missing = [f"{s}.{k}" for s, k in values if (s, k) not in done]
    if missing:
        raise InstallError(f"config template has no key {', '.join(missing)}", reason="install_template")
    result = "".join(out)
    try:
        parsed = tomllib.loads(result)
    except tomllib.TOMLDecodeError as exc:  # e.g. a value continued over several lines
        raise InstallError(f"config template no longer parses after the edit: {exc}", reason="install_template") from None
    for (s, k), v in values.items():
        if parsed[s][k] != (list(v) if isinstance(v, tuple) else v):
            raise InstallError(f"could not set {s}.{k} in the config template", reason="install_template")
    return result


def render_unit(text: str, exec_start: str, evidence: Sequence[str]) -> str:
    """The shipped unit with this machine's ``ExecStart=`` and one ``ReadOnlyPaths=`` per evidence folder."""
    lines = text.splitlines()
    exec_at = [i for i, l in enumerate(lines) if l.startswith("ExecStart=")]
    ro_at = [i for i, l in enumerate(lines) if l.startswith("ReadOnlyPaths=")]
    if len(exec_at) != 1 or not ro_at:
        raise InstallError("unit template needs exactly one ExecStart= and a ReadOnlyPaths= line",
                           reason="install_template")
    lines[exec_at[0]] = f"ExecStart={exec_start}"
    # "-": a share that is not mounted yet must not stop the service from starting.
    ro = [f"ReadOnlyPaths={_quote_path('-' + d)}" for d in evidence]
    lines[ro_at[0]: ro_at[-1] + 1] = ro
    return "\n".join(lines) + "\n"


def _quote_exec(arg: str) -> str:
    """Quote one ExecStart= word the way systemd.service(5) reads it."""
    if arg and not re.search(r"[\s\"'\\;$%]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$") + '"'


def _quote_path(path: str) -> str:
    """Quote one path of a ``ReadOnlyPaths=`` list: spaces split the list, ``%`` starts a specifier."""
    path = path.replace("%", "%%")
    if not re.search(r"[\s\"'\\]", path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def find_devrecd(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ``devrecd`` executable the service should run: given, on PATH, or beside this Python."""
    if explicit:
        return Path(explicit).absolute()
    beside = Path(sys.executable).parent / "devrecd"  # the venv this installer runs from
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("devrecd")
    return Path(found).absolute() if found else None


# --- planning and applying ------------------------------------------------------------------------

def plan_install(root: str | os.PathLike = "/", *, evidence: Iterable[str] = DEFAULT_EVIDENCE,
                 devrecd_bin: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                 allow_home: bool = False) -> Plan:
    """Compute every file ``install-service`` writes; nothing on disk changes."""
    files, doc = _service_files(source)
    evidence = [os.path.abspath(e) for e in evidence]
    if not evidence:
        raise InstallError("give at least one evidence folder (--evidence DIR)", reason="install_evidence")
    for e in evidence:
        if Path(e) == STATE_ROOT or STATE_ROOT in Path(e).parents or Path(e) in STATE_ROOT.parents:
            raise InstallError(f"evidence folder {e} overlaps the service state {STATE_ROOT}", reason="install_evidence")

    exe = find_devrecd(devrecd_bin)
    notes: list[str] = []
    if exe is None:
        exec_words = ["/usr/bin/env", "devrecd"]
        notes.append("no devrecd executable found: ExecStart uses /usr/bin/env devrecd (it must be on systemd's PATH)")
    else:
        if not allow_home and any(p in (Path("/home"), Path("/root")) for p in exe.parents):
            raise InstallError(f"{exe} is under /home or /root, which the service cannot see (ProtectHome=yes): "
                               "install devrecd in a venv under /opt (see docs/operations.md) or pass --allow-home",
                               reason="install_home")
        exec_words = [str(exe)]
    exec_start = " ".join(_quote_exec(w) for w in [*exec_words, "watch", "--config", str(CONFIG_PATH)])

    config_text = set_toml_values(files["config.toml"].read_text(encoding="utf-8"),
                                  {**SERVICE_SETTINGS, ("watch", "dirs"): evidence})
    _check_config(config_text)
    steps = [
        Step(UNIT_DEST, render_unit(files[UNIT_NAME].read_text(encoding="utf-8"), exec_start, evidence).encode(), 0o644),
        Step(SYSUSERS_DEST, files["devrecd.sysusers"].read_bytes(), 0o644),
        Step(TMPFILES_DEST, files["devrecd.tmpfiles"].read_bytes(), 0o644),
        Step(CONFIG_PATH, config_text.encode(), 0o644, keep_existing=True),
        Step(ENV_PATH, files["devrecd.env"].read_bytes(), 0o640, keep_existing=True),
    ]
    if doc.is_file():
        steps.append(Step(DOC_DEST, doc.read_bytes(), 0o644))
    return Plan(Path(root).absolute(), steps, exec_start, notes)


def _service_files(source: str | os.PathLike | None) -> tuple[dict[str, Traversable], Traversable]:
    """The files to install (unit, sysusers, tmpfiles, env, config.toml) and the operations guide:
    from the installed package, or from the source checkout ``source`` (its systemd/, config.toml, docs/)."""
    names = (UNIT_NAME, "devrecd.sysusers", "devrecd.tmpfiles", "devrecd.env")
    files: dict[str, Traversable]
    if source:
        src = Path(source)
        files = {name: src / "systemd" / name for name in names} | {"config.toml": src / "config.toml"}
        doc: Traversable = src / "docs" / "operations.md"
    else:
        shipped = resources.files("devrecd.service_files")
        files = {name: shipped / name for name in (*names, "config.toml")}
        doc = shipped / "operations.md"
    absent = [str(p) for p in files.values() if not p.is_file()]
    if absent:
        where = f"the source checkout {source} (systemd/, config.toml)" if source else "the installed devrecd package"
        raise InstallError(f"service files not found in {where}: {', '.join(absent)}", reason="install_sources")
    return files, doc


def _check_config(text: str) -> None:
    """The config we install must load (same loader as the daemon), or the service would not start."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", encoding="utf-8", delete=False) as fh:
        fh.write(text)
    try:
        load_config(fh.name, env={})
    finally:
        os.unlink(fh.name)


def apply_plan(plan: Plan, *, force: bool = False) -> list[Path]:
    """Write the plan's files (atomically, with their modes); returns the paths written."""
    written = []
    for step in plan.steps:
        target = plan.target(step)
        if step.keep_existing and target.exists() and not force:
            continue
        try:
            atomic_write(target, step.content, mode=step.mode)
        except OSError as exc:
            raise InstallError(f"cannot write {target}: {exc.strerror or exc} (run as root, or use --prefix DIR)",
                               reason="install_write") from None
        written.append(target)
    return written


def activate(plan: Plan) -> list[str]:
    """Create the user and folders (systemd-sysusers, systemd-tmpfiles) in the plan's root, and make a
    running systemd see the unit (``daemon-reload``, only when the root is ``/``).

    Returns the commands run. Enabling and starting stay with the operator (the model comes first).
    """
    commands: list[list[str]] = []
    root_args = [] if plan.root == Path("/") else [f"--root={plan.root}"]
    for tool, conf in (("systemd-sysusers", SYSUSERS_DEST), ("systemd-tmpfiles", TMPFILES_DEST)):
        if shutil.which(tool) is None:
            raise InstallError(f"{tool} not found: install systemd (apt-get install systemd) or run it by hand",
                               reason="install_tool")
        extra = ["--create"] if tool == "systemd-tmpfiles" else []
        # The bare name: the tool looks it up in its own .d folders, under --root when given.
        commands.append([tool, *root_args, *extra, conf.name])
    if plan.root == Path("/") and Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        commands.append(["systemctl", "daemon-reload"])
    ran = []
    for cmd in commands:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise InstallError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}",
                               reason="install_activate")
        ran.append(" ".join(cmd))
    return ran


def next_steps(plan: Plan) -> list[str]:
    """What the operator does after installing (model, engine, enable)."""
    return [
        f"put the model in {STATE_ROOT}/models/ and set backend.model in {CONFIG_PATH} (or {ENV_PATH})",
        f"on a GPU: devrecd build-engine MODEL.onnx, engine into {STATE_ROOT}/engine/ (docs/operations.md)",
        "systemctl enable --now devrecd && systemctl status devrecd",
    ]
