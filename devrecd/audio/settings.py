"""``[audio]``: what decoding and windowing recordings accept (:class:`AudioConfig`).

Declared here, beside the code that reads it (:mod:`devrecd.audio.decode`, the decoders, the
channel round trip), so that the audio package needs nothing above it; :mod:`devrecd.config`
assembles it with the other sections and checks it with the same mechanism
(:mod:`devrecd.validation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from devrecd.validation import Count, Dbfs, Fraction, NonNegFloat, PositiveFloat, Range, Section


@dataclass(frozen=True)
class AudioConfig(Section):
    """Decoding and windowing of recordings (serving and training)."""

    section: ClassVar[str] = "audio"
    hop_seconds: PositiveFloat = 2.0  # window hop when cutting recordings into clips (serving)
    min_seconds: NonNegFloat = 2.0  # shorter recordings are rejected (between this and one clip: wrap-padded)
    max_seconds: PositiveFloat = 4 * 3600.0  # longer recordings are rejected before decoding
    max_bytes: Count = 2 * 1024**3  # larger files are rejected before reading
    silence_dbfs: Dbfs = -90.0  # a recording whose RMS level is below this is "silent" (16-bit +-1 LSB noise: -92 dBFS)
    mix: Literal["mean", "first"] = "mean"  # how channels become mono: average, or the first channel
    resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ"] = "VHQ"  # soxr quality when the rate differs
    max_decoded_samples: Count = 4 * 3600 * 48000 * 2  # frames x channels; larger is refused before decoding
    clip_fraction: Fraction = 0.01  # verdict flag "clipping": this share of samples at full scale
    dc_offset: Annotated[float, Range(ge=0, le=1)] = 0.1  # verdict flag "dc_offset": |mean sample| at or above this
    loud_dbfs: Dbfs = -6.0  # verdict flag "loud": RMS level above this (e.g. full-scale noise)
    # windows one recording may be cut into: audio.max_seconds / audio.hop_seconds must stay within it
    max_windows: Annotated[int, Range(ge=1, le=1_000_000)] = 100_000

    def relations(self) -> list[str]:
        problems = ["audio.min_seconds must be <= audio.max_seconds"] if self.min_seconds > self.max_seconds else []
        windows = self.max_seconds / self.hop_seconds + 1
        if windows > self.max_windows:
            problems.append(f"audio.hop_seconds = {self.hop_seconds:g} cuts a recording of audio.max_seconds = "
                            f"{self.max_seconds:g} s into {windows:.3g} windows, over audio.max_windows = "
                            f"{self.max_windows}: raise the hop or lower audio.max_seconds")
        return problems
