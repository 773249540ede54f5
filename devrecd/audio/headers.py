"""What the raw bytes of an audio file declare, read without a decoder: the container their leading
bytes announce, a WAV's RIFF/RF64 chunks (one walker, :func:`riff_chunks`), a FLAC's STREAMINFO, and
an Ogg stream's last page. The decoders (:mod:`devrecd.audio.decoders`) and the stream
(:mod:`devrecd.audio.decode`) turn what these find into refusals or integrity findings:

* ``truncated``: an Ogg stream whose last page is cut short or lacks the end-of-stream flag, seen in
  the file's tail kept by the hashing pass (:func:`check_ogg_tail`);
* ``header_length_mismatch``: an RF64 ``ds64`` chunk that claims more frames than the data chunk
  holds (:func:`check_riff`). A WAV whose data chunk is cut short is refused (``corrupt``):
  libsndfile would read what is there without a word.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

from devrecd.audio.errors import CorruptAudio

# Leading bytes of containers we know; used to tell "damaged X" from "not audio at all".
_MAGIC = (
    (0, b"RIFF", "WAV"), (0, b"RF64", "WAV"), (0, b"fLaC", "FLAC"), (0, b"OggS", "OGG"),
    (0, b"ID3", "MP3"), (0, b"#!AMR", "AMR"), (4, b"ftyp", "MP4"), (0, b"FORM", "AIFF"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"), (0, b"caff", "CAF"),
)


def sniff_container(data: bytes) -> str | None:
    """Name of the container the leading bytes announce, if any."""
    for offset, magic, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "MPEG audio"
    return None


def riff_chunks(fh: BinaryIO, end: int, limit: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(id, size, offset) of each chunk of a RIFF/RF64 file after its 12-byte header, at most
    ``limit``; ``fh`` stands at the chunk's body when each is yielded. Stops at a chunk header cut
    short (``end``: the file's size)."""
    pos, count = 12, 0
    while pos + 8 <= end and (limit is None or count < limit):
        fh.seek(pos)
        hdr = fh.read(8)
        if len(hdr) < 8:
            return
        cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        yield cid, size, pos
        pos += 8 + size + (size & 1)
        count += 1


def declared_rate(fh: BinaryIO) -> int | None:
    """The sample rate a WAV (RIFF/RF64 ``fmt `` chunk) or FLAC (STREAMINFO) header declares, read
    from the raw bytes; None when there is no such header or it is cut short."""
    fh.seek(0)
    head = fh.read(12)
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        # a few chunks precede "fmt " in practice (ds64, JUNK, bext)
        for cid, _, _ in riff_chunks(fh, fh.seek(0, os.SEEK_END), limit=64):
            if cid == b"fmt ":
                body = fh.read(8)  # format tag, channels, sample rate
                return struct.unpack("<I", body[4:8])[0] if len(body) == 8 else None
        return None
    if head[:4] == b"fLaC":
        fh.seek(0)
        info = flac_streaminfo(fh.read(42))
        return info["rate"] if info else None
    return None


def flac_streaminfo(head: bytes) -> dict | None:
    """The STREAMINFO of a FLAC file from its first 42 bytes (magic, block header, 34-byte body):
    rate, channels, bits per sample, total samples (0: unknown) and the MD5 of the decoded samples
    (16 zero bytes: not computed by the encoder); None when the bytes are not that."""
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
        return None
    b = head[8:42]
    return {"rate": b[10] << 12 | b[11] << 4 | b[12] >> 4, "channels": (b[12] >> 1 & 7) + 1,
            "bits": ((b[12] & 1) << 4 | b[13] >> 4) + 1,
            "total_samples": (b[13] & 0xF) << 32 | int.from_bytes(b[14:18], "big"), "md5": bytes(b[18:34])}


def check_ogg_tail(tail: bytes, size: int) -> list[tuple[str, str]]:
    """An Ogg file cut short: its last page is incomplete, or complete without the end-of-stream
    flag that every finished logical stream ends with. ``tail``: the file's last bytes."""
    at = len(tail)
    while (at := tail.rfind(b"OggS", 0, at)) >= 0:
        hdr = tail[at : at + 27]
        if hdr[4:5] not in (b"", b"\0"):
            continue  # version 0 is the only one: "OggS" inside a packet, look further back
        cut = f"Ogg: the last page (at byte {size - len(tail) + at}) is cut short"
        if len(hdr) < 27 or len(tail) < at + 27 + hdr[26]:
            return [("truncated", f"{cut} inside its header")]
        nseg = hdr[26]
        end = at + 27 + nseg + sum(tail[at + 27 : at + 27 + nseg])
        if end > len(tail):
            return [("truncated", f"{cut}: {len(tail) - at} of {end - at} bytes are present")]
        if end < len(tail) or hdr[5] & 0x04:
            return []  # ends with the end-of-stream flag (bytes after the last page are not a cut)
        granule = struct.unpack("<q", hdr[6:14])[0]
        return [("truncated", f"Ogg: the last page (granule position {granule}) lacks the end-of-stream "
                              "flag: the stream stops before its end")]
    return []


def check_riff(path: Path, fh: BinaryIO) -> list[tuple[str, str]]:
    """libsndfile quietly reads what is there of a truncated WAV; refuse it instead. An RF64 whose
    ``ds64`` chunk claims more frames than its data holds is judged with ``header_length_mismatch``.
    -> integrity findings (flag, note)."""
    end = os.fstat(fh.fileno()).st_size
    ds64, block_align = None, 0
    for cid, size, pos in riff_chunks(fh, end):
        if cid == b"ds64":  # RF64: 64-bit RIFF size, data size and sample (frame) count
            body = fh.read(24)
            ds64 = struct.unpack("<QQQ", body) if len(body) == 24 else None
        elif cid == b"fmt ":
            body = fh.read(14)
            block_align = struct.unpack("<H", body[12:14])[0] if len(body) == 14 else 0
        elif cid == b"data":
            available = end - pos - 8
            # 0 and 0xFFFFFFFF are "size unknown" (streamed / RF64); they cannot be checked.
            if size not in (0, 0xFFFFFFFF) and available < size:
                raise CorruptAudio(path, f"truncated WAV: the data chunk declares {size} bytes, {available} are present")
            if size == 0xFFFFFFFF and ds64 is not None:
                data_size, frames = ds64[1], ds64[2]
                if data_size > available:
                    raise CorruptAudio(path, f"truncated RF64: the ds64 chunk declares {data_size} data bytes, "
                                             f"{available} are present")
                held = min(data_size, available) // block_align if block_align else 0
                if block_align and frames > held:
                    return [("header_length_mismatch", f"RF64: the ds64 chunk claims {frames} frames, the data chunk "
                                                       f"holds {held}")]
            return []
    return []
