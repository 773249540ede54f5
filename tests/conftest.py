"""Shared fixtures: where ``../shared`` lives, real recordings, and thread-leak checks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    return Path(os.environ.get("DEVRECD_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (or $DEVRECD_SHARED); tests that need it skip with a reason when absent."""
    path = _shared()
    if not (path / "data").is_dir():
        pytest.skip(f"shared data not found at {path} (set DEVRECD_SHARED); CI provides it")
    return path


@pytest.fixture(scope="session")
def ccnu_dir(shared_dir: Path) -> Path:
    """The real 15-phone CCNU_Mobile sample."""
    path = shared_dir / "data" / "ccnu_mobile_sample"
    if not (path / "manifest.csv").is_file():
        pytest.skip(f"CCNU_Mobile sample not found at {path}")
    return path


@pytest.fixture(scope="session")
def librispeech_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "librispeech"
    if not path.is_dir():
        pytest.skip(f"LibriSpeech not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Fail a test that leaves a non-daemon thread running (as watchdog's own suite does)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"
