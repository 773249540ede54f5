"""Transmission channels by name: what a channel IS (a codec at its bit rate and native rate, or a
band limit). Passing audio through one is :mod:`devrecd.audio.transmit`. This table is a leaf: the
configuration (channel names it accepts), the condition measurement (which channel matches a
recording) and the transmission code all read it.
"""

from __future__ import annotations

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

    @property
    def key(self) -> str:
        """What copies of a recording through this channel are cached under: the name (what
        calibrations and channel models are keyed by) and the storage rate where it is set."""
        return f"{self.name}@{self.stored_rate}" if self.stored_rate else self.name

    def to_json(self) -> dict:
        out = {"name": self.name, "description": self.description, "rate": self.rate}
        if self.encoder:
            out.update(codec=self.codec, encoder=self.encoder, bitrate=self.bitrate)
        else:
            out.update(low_hz=self.low_hz, high_hz=self.high_hz)
            if self.stored_rate:
                out["stored_rate"] = self.stored_rate
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


def stored_as(channel: Channel, codec: str, native_rate: int) -> Channel:
    """``channel`` as a file of ``codec`` at ``native_rate`` holds it: a band limit stored as 16-bit
    PCM at a rate other than the channel's carries that storage (:attr:`Channel.stored_rate`); a
    codec, or any other storage, is the channel itself (a codec's decoder, not a quantiser, sets
    what lies above its band; 24-bit and float PCM add no noise the scorer sees)."""
    if channel.encoder or codec not in PCM16_CODECS or int(native_rate) <= 0 or int(native_rate) == channel.rate:
        return channel
    return replace(channel, stored_rate=int(native_rate))


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
