"""Transmission channels by name: what a channel IS (a codec at its bit rate and native rate, or a
band limit). Passing audio through one is :mod:`devrecd.audio.transmit`. This table is a leaf: the
configuration (channel names it accepts), the condition measurement (which channel matches a
recording) and the transmission code all read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from devrecd.errors import DevrecdError

class ChannelError(DevrecdError):
    """A channel cannot be applied (unknown name, bad audio, the encoder failed)."""

    reason = "channel"


class ChannelUnavailable(ChannelError):
    """The channel's encoder is not in the FFmpeg build that PyAV bundles."""

    reason = "channel_unavailable"


@dataclass(frozen=True)
class Channel:
    """A named transmission condition.

    ``encoder`` empty = a pure band limit (``low_hz``..``high_hz`` at ``rate``, 16-bit); otherwise
    the PyAV encoder, its container format, bit rate (bit/s) and native sample rate.
    """

    name: str
    description: str
    rate: int  # native rate of the channel (Hz)
    encoder: str = ""
    container: str = ""
    bitrate: int = 0
    codec: str = ""  # the decoder's codec name, as a decoded Recording reports it
    low_hz: float = 0.0  # band-limit channels: pass band
    high_hz: float = 0.0
    # Band limits only: the band-limited signal was then stored as 16-bit PCM at this rate (0: at the
    # channel's own rate). A telephone-band call saved as a 32 kHz WAV carries its quantiser's white
    # noise (~-101 dBFS) in every band above the channel's; a copy made at 8 kHz has none there, and
    # compared with it the recording reads 10-18 dB noisier than its references (mean over the noise
    # bands) and scores against none of them as it should. :func:`stored_as` gives the channel of a file.
    stored_rate: int = 0
    # A quiet file stored as 16-bit PCM (any channel without a codec, and a broadband recording: the
    # storage channel :data:`PCM16_STORAGE`): its speech level in dBFS, on a grid of
    # :data:`STORED_LEVEL_STEP_DB`. The quantiser's floor (~-101 dBFS) sits that much nearer to the
    # speech and fills the bands where the phone left little (a 30 dB quieter copy of a CCNU
    # recording reads 7 dB more noise in its top bands). A copy is brought to this speech level
    # before it is stored, so it carries the same floor. None: stored at its own level.
    stored_level_dbfs: float | None = None

    @property
    def is_storage(self) -> bool:
        """A storage alone (no codec, no band limit): the recording as recorded, only stored anew."""
        return not self.encoder and not self.high_hz

    @property
    def key(self) -> str:
        """What copies of a recording through this channel are cached under: the name (what
        calibrations and channel models are keyed by), the storage rate and level where set."""
        key = f"{self.name}@{self.stored_rate}" if self.stored_rate else self.name
        return key if self.stored_level_dbfs is None else f"{key}@{self.stored_level_dbfs:g}dBFS"

    @property
    def storage(self) -> str:
        """How copies through this channel are stored to match the questioned file ("" when as the channel leaves them)."""
        if not self.stored_rate and self.stored_level_dbfs is None:
            return ""
        level = "" if self.stored_level_dbfs is None else f", speech brought to {self.stored_level_dbfs:g} dBFS"
        return f"16-bit PCM at {self.stored_rate or self.rate} Hz{level}"

    def to_json(self) -> dict:
        out = {"name": self.name, "description": self.description, "rate": self.rate}
        if self.encoder:
            out.update(codec=self.codec, encoder=self.encoder, bitrate=self.bitrate)
        elif not self.is_storage:
            out.update(low_hz=self.low_hz, high_hz=self.high_hz)
        if not self.encoder and self.stored_rate:
            out["stored_rate"] = self.stored_rate
        if self.stored_level_dbfs is not None:
            out["stored_level_dbfs"] = self.stored_level_dbfs
        return out


# The named conditions (bit rates and native rates as phones, messaging apps and call recorders use them).
CHANNELS: dict[str, Channel] = {c.name: c for c in (
    Channel("aac64", "AAC-LC 64 kbit/s, 48 kHz (voice memos, messaging apps, exports)", 48000,
            "aac", "adts", 64000, "aac"),
    Channel("opus32", "Opus 32 kbit/s, 48 kHz (voice messages)", 48000,
            "libopus", "ogg", 32000, "opus"),
    Channel("opus16", "Opus 16 kbit/s, 48 kHz (voice messages on a poor link)", 48000,
            "libopus", "ogg", 16000, "opus"),
    Channel("amrnb", "AMR-NB 12.2 kbit/s, 8 kHz (GSM/UMTS call recordings)", 8000,
            "libopencore_amrnb", "amr", 12200, "amrnb"),
    Channel("amrwb", "AMR-WB 23.85 kbit/s, 16 kHz (HD-voice call recordings)", 16000,
            "libvo_amrwbenc", "amr", 23850, "amrwb"),
    Channel("mp3_64", "MP3 64 kbit/s, 44.1 kHz (re-encoded exports)", 44100,
            "libmp3lame", "mp3", 64000, "mp3"),
    Channel("tel", "telephone band 300-3400 Hz, 8 kHz, 16-bit", 8000,
            low_hz=300.0, high_hz=3400.0),
)}


PCM16_CODECS = frozenset({"PCM_16", "pcm_s16le", "pcm_s16be"})  # what the two decoders call 16-bit PCM
CLEAN = "clean"  # the comparison condition of a broadband recording (no channel)
# A broadband recording stored anew as 16-bit PCM (a quiet file: :func:`stored_as`); compared under
# ``clean`` with references stored the same way.
PCM16_STORAGE = Channel(CLEAN, "as recorded, stored as 16-bit PCM", 0)  # rate: the file's (stored_as)
# 16-bit PCM speech quieter than this (dBFS) is compared with references stored at its level: the
# quantiser's floor (-101 dBFS) is then within 60 dB of the speech, where the quietest bands of half
# the CCNU references lie (their median quietest band is 53.5 dB below speech; 6 dB of margin). Louder,
# it lies 10 dB and more under every band of most phones and a re-stored copy scores as the original.
QUIET_PCM16_DBFS = -40.0  # (the floor 61 dB under the speech: 7.5 dB under that median band)
STORED_LEVEL_STEP_DB = 2.0  # the level a copy is stored at, on this grid (the floor then differs by <= 1 dB)


def stored_as(channel: Channel | None, codec: str, native_rate: int, speech_dbfs: float | None = None) -> Channel | None:
    """``channel`` (None: broadband, as recorded) as a file of ``codec`` at ``native_rate``, whose
    speech lies at ``speech_dbfs``, holds it. Stored as 16-bit PCM: a band limit at a rate other
    than the channel's carries that storage (:attr:`Channel.stored_rate`), and speech quieter than
    :data:`QUIET_PCM16_DBFS` its level (:attr:`Channel.stored_level_dbfs`; a broadband recording is
    then :data:`PCM16_STORAGE` at its rate). A codec, or any other storage, is the channel itself
    (a codec's decoder, not a quantiser, sets what lies above its band; 24-bit and float PCM add no
    noise the scorer sees)."""
    rate = int(native_rate)
    if (channel is not None and channel.encoder) or codec not in PCM16_CODECS or rate <= 0:
        return channel
    quiet = speech_dbfs is not None and math.isfinite(speech_dbfs) and speech_dbfs < QUIET_PCM16_DBFS
    if channel is None:
        if not quiet:
            return None
        channel = replace(PCM16_STORAGE, rate=rate, stored_rate=rate)  # the rate in its key: copies per rate
    if rate != channel.rate:
        channel = replace(channel, stored_rate=rate)
    if quiet:
        channel = replace(channel, stored_level_dbfs=STORED_LEVEL_STEP_DB * round(float(speech_dbfs) / STORED_LEVEL_STEP_DB))
    return channel


def get_channel(name: str) -> Channel:
    """A channel by name (``aac64``, ``opus32``, ``opus16``, ``amrnb``, ``amrwb``, ``mp3_64``, ``tel``)."""
    try:
        return CHANNELS[name]
    except KeyError:
        raise ChannelError(f"unknown channel {name!r} (known: {', '.join(CHANNELS)})", reason="unknown_channel") from None


def band_limit(low_hz: float, high_hz: float, rate: int = 0) -> Channel:
    """A pure band limit (a measured band of a recording whose codec is not known)."""
    low_hz, high_hz = float(round(low_hz)), float(round(high_hz))  # whole Hz: the name says it exactly
    if not 0.0 <= low_hz < high_hz:
        raise ChannelError(f"a band limit needs 0 <= low < high, got {low_hz:g}-{high_hz:g} Hz")
    rate = rate or max(8000, int(2 * round(high_hz * 1.1 / 1000.0) * 1000))
    return Channel(f"band{int(low_hz)}-{int(high_hz)}",
                   f"band limit {low_hz:.0f}-{high_hz:.0f} Hz (measured)", rate,
                   low_hz=float(low_hz), high_hz=float(high_hz))
