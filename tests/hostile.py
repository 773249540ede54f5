"""A hostile evidence corpus: every way a file (or something that is not one) can try to hang,
kill, bloat or fool the intake, plus good files with hostile names.

:func:`build` writes it under a folder and returns what each entry must become: ``judged`` (good
content, whatever its name) or ``failed`` with one specific reason, and whether a sha256 must be
recorded (every entry whose bytes were read). Used by ``tests/test_hostile.py`` (the daemon against
all of it) and by ``benchmarks/intake.py``.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 32000


@dataclass(frozen=True)
class Expect:
    """What the daemon must record for one entry."""

    outcome: str  # "judged" | "duplicate" | "failed"
    reason: str | None = None
    hashed: bool = True  # a sha256 (of the bytes read) must be in the record
    flags: tuple[str, ...] = ()  # level flags a judged verdict must carry


def _wav(path: Path, x: np.ndarray, rate: int = SR, subtype: str = "PCM_16") -> Path:
    sf.write(path, x, rate, subtype=subtype)
    return path


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Noise bursts with a syllable rhythm: a level a real recording has (not silent, not clipped)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(n) / SR)
    return (0.05 * env * rng.standard_normal(n)).astype(np.float32)


def build(root: Path, good_sources: list[Path], outside: Path) -> tuple[dict[str, Expect], list[Path]]:
    """Write the corpus into ``root`` (``outside``: a folder beside it, for links that leave the tree).

    Returns ``{relative name: Expect}`` and the sockets' paths (the caller keeps nothing open: a
    socket file stays after its listener closes). ``good_sources``: >= 3 real recordings.
    """
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    exp: dict[str, Expect] = {}
    good = [p.read_bytes() for p in good_sources[:3]]
    wav = good[0]

    # --- good content, hostile names (each judged exactly once) ---------------------------------
    for name, data in (("good one.wav", good[0]), ("new\nline.wav", good[1]), ("-rf --leading-dash.wav", good[2]),
                       ("tab\tand\x1bescape.wav", good[1][:-10] + bytes(10)), ("ünï ☃ 名前.wav", good[0][:-10] + bytes(10))):
        (root / name).write_bytes(data)
        exp[name] = Expect("judged")
    # a FLAC and an m4a renamed .wav: the content decides, not the name
    x, rate = sf.read(good_sources[0], dtype="float32")
    sf.write(root / "flac named.wav", x, rate, format="FLAC")
    exp["flac named.wav"] = Expect("judged")
    from tests.media import encode

    encode(x, rate, root / "aac named.wav", codec="aac", fmt="ipod", out_rate=rate)
    exp["aac named.wav"] = Expect("judged")
    # abnormal but finite levels: judged, with the flags an examiner must see
    _wav(root / "dc offset.wav", _speechlike(4, 1) + 0.5, subtype="FLOAT")
    exp["dc offset.wav"] = Expect("judged", flags=("dc_offset",))
    _wav(root / "full scale noise.wav", np.random.default_rng(2).uniform(-1, 1, 4 * SR).astype(np.float32))
    exp["full scale noise.wav"] = Expect("judged", flags=("loud",))
    _wav(root / "square clipped.wav", np.sign(np.sin(np.arange(4 * SR) / 20)).astype(np.float32))
    exp["square clipped.wav"] = Expect("judged", flags=("clipping",))

    # --- truncations at many offsets ------------------------------------------------------------
    (root / "trunc 0.wav").write_bytes(b"")
    exp["trunc 0.wav"] = Expect("failed", "empty")
    for cut in (4, 12, 20, 36, 44, 45, 1000, len(wav) // 3, len(wav) - 1):
        name = f"trunc {cut}.wav"
        (root / name).write_bytes(wav[:cut])
        exp[name] = Expect("failed", "corrupt")
    flac = (root / "flac named.wav").read_bytes()
    (root / "trunc half.flac").write_bytes(flac[: len(flac) // 2])
    exp["trunc half.flac"] = Expect("judged")  # the audio before the cut, flagged "truncated" (test_integrity.py)
    aac = (root / "aac named.wav").read_bytes()
    (root / "trunc half.m4a").write_bytes(aac[: len(aac) // 2])
    exp["trunc half.m4a"] = Expect("failed", "corrupt")

    # --- bad header fields ----------------------------------------------------------------------
    # PCM WAV layout: 22 channels, 24 rate, 28 byte rate, 32 block align, 34 bits, 40 data size.
    for name, off, fmt, val, reason in (
        ("rate 1 Hz.wav", 24, "<I", 1, "implausible_rate"),
        ("rate 3999.wav", 24, "<I", 3999, "implausible_rate"),
        ("rate 1 MHz.wav", 24, "<I", 1_000_000, "implausible_rate"),
        ("rate 4 GHz.wav", 24, "<I", 4_000_000_000, "implausible_rate"),  # beyond what any decoder opens
        ("rate 0.wav", 24, "<I", 0, "corrupt"),
        ("channels 0.wav", 22, "<H", 0, "corrupt"),
        ("format tag 0x1234.wav", 20, "<H", 0x1234, "unsupported"),
        ("data size 2 GB.wav", 40, "<I", 0x7FFF0000, "corrupt"),
    ):
        (root / name).write_bytes(_patch(wav, off, fmt, val))
        exp[name] = Expect("failed", reason)

    # --- not audio, under audio names -----------------------------------------------------------
    (root / "text.mp3").write_bytes(b"this is a letter, not a recording\n" * 300)
    exp["text.mp3"] = Expect("failed", "unsupported")
    (root / "random.m4a").write_bytes(np.random.default_rng(3).bytes(30_000))
    exp["random.m4a"] = Expect("failed", "unsupported")
    (root / "riff junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE" + np.random.default_rng(4).bytes(5000))
    exp["riff junk.wav"] = Expect("failed", "corrupt")
    (root / "id3 only.mp3").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 2000)
    exp["id3 only.mp3"] = Expect("failed", "corrupt")
    with open(root / "sparse zeros.wav", "wb") as fh:  # a hole: 64 MB of nothing
        fh.truncate(64 * 1024**2)
    exp["sparse zeros.wav"] = Expect("failed", "unsupported")
    with open(root / "sparse huge.wav", "wb") as fh:  # over audio.max_bytes: refused from stat, never read
        fh.write(wav[:44])
        fh.truncate(2 * 1024**3 + 1)
    exp["sparse huge.wav"] = Expect("failed", "too_long", hashed=False)

    # --- samples that are not numbers, or no signal ---------------------------------------------
    for name, bad in (("nan.wav", np.nan), ("inf.wav", np.inf), ("minus inf.wav", -np.inf)):
        x = _speechlike(4, 5)
        x[SR : SR + 100] = bad
        _wav(root / name, x, subtype="FLOAT")
        exp[name] = Expect("failed", "nonfinite")
    _wav(root / "1e30.wav", _speechlike(4, 6) * 1e30, subtype="FLOAT")  # finite, beyond any recording's
    exp["1e30.wav"] = Expect("failed", "nonfinite")
    _wav(root / "silent.wav", np.zeros(4 * SR, np.float32))
    exp["silent.wav"] = Expect("failed", "silent")
    _wav(root / "short.wav", _speechlike(0.5, 7))
    exp["short.wav"] = Expect("failed", "too_short")
    _wav(root / "no samples.wav", np.zeros(0, np.float32))
    exp["no samples.wav"] = Expect("failed", "empty")
    # a decompression bomb: 8 channels of 48 kHz in a few KB (refused by the decoded-samples cap)
    sf.write(root / "bomb.flac", np.zeros((48000 * 60, 8), np.int16), 48000, format="FLAC")
    exp["bomb.flac"] = Expect("failed", "too_long")

    # --- entries that are not regular files -----------------------------------------------------
    os.mkfifo(root / "fifo.wav")
    exp["fifo.wav"] = Expect("failed", "not_a_file", hashed=False)
    (root / "folder.wav").mkdir()
    exp["folder.wav"] = Expect("failed", "not_a_file", hashed=False)
    sockets = [root / "socket.wav"]
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sockets[0]))
    s.close()
    exp["socket.wav"] = Expect("failed", "not_a_file", hashed=False)
    os.symlink("/dev/zero", root / "dev zero.wav")  # a device, and outside the tree: never opened
    exp["dev zero.wav"] = Expect("failed", "external_link", hashed=False)
    os.symlink(root / "fifo.wav", root / "link to fifo.wav")
    exp["link to fifo.wav"] = Expect("failed", "not_a_file", hashed=False)
    os.symlink(root / "loop b.wav", root / "loop a.wav")
    os.symlink(root / "loop a.wav", root / "loop b.wav")
    exp["loop a.wav"] = Expect("failed", "link_loop", hashed=False)
    exp["loop b.wav"] = Expect("failed", "link_loop", hashed=False)
    os.symlink(root / "nowhere.wav", root / "dangling.wav")
    exp["dangling.wav"] = Expect("failed", "missing", hashed=False)
    (outside / "secret.wav").write_bytes(good[2])
    os.symlink(outside / "secret.wav", root / "leaves the tree.wav")
    exp["leaves the tree.wav"] = Expect("failed", "external_link", hashed=False)
    os.symlink("/etc/passwd", root / "passwd.wav")
    exp["passwd.wav"] = Expect("failed", "external_link", hashed=False)
    os.symlink(root / "good one.wav", root / "link inside.wav")  # stays in the tree: followed, judged
    exp["link inside.wav"] = Expect("duplicate")  # the same content as "good one.wav"
    return exp, sockets
