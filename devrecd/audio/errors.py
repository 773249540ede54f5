"""Bad-input errors of audio intake, one type per reason.

``reason`` is the short label used in metrics (``devrecd_errors_total{reason}``) and the journal.
``sha256`` and ``size`` are set when the file's bytes were read before the error was found, so the
failed record still names exactly what was looked at (chain of custody).
"""

from __future__ import annotations

from devrecd.errors import DevrecdError


class AudioError(DevrecdError):
    """A recording cannot be judged. Subclasses say why."""

    reason = "audio"

    def __init__(self, path: object, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = str(path)
        self.detail = detail
        self.sha256: str | None = None  # of the bytes read, when they were read
        self.size: int | None = None
        self.resolved_path: str | None = None  # where a followed symbolic link led


class MissingAudio(AudioError):
    reason = "missing"


class UnreadableAudio(AudioError):
    """Exists but cannot be opened for reading (permissions, an I/O error)."""

    reason = "unreadable"


class NotAFile(AudioError):
    """A FIFO, socket, device, directory or a link to one: never opened in a way that can block."""

    reason = "not_a_file"


class LinkLoop(AudioError):
    """A symbolic link that leads back to itself (or through too many links)."""

    reason = "link_loop"


class ExternalLink(AudioError):
    """A symbolic link that leaves the watched folders (``watch.follow_external_links = false``)."""

    reason = "external_link"


class ChangedAudio(AudioError):
    """The file changed while it was being read; what was hashed may not be what was decoded."""

    reason = "changed"


class EmptyAudio(AudioError):
    """Zero bytes, or a valid container with no samples in it."""

    reason = "empty"


class CorruptAudio(AudioError):
    """Truncated or damaged: the container promises more than the file holds, or decoding fails."""

    reason = "corrupt"


class UnsupportedAudio(AudioError):
    """Not a format or codec any installed decoder reads."""

    reason = "unsupported"


class ImplausibleRate(AudioError):
    """A sample rate no recording device writes (a damaged or hostile header)."""

    reason = "implausible_rate"


class NonFiniteAudio(AudioError):
    """Floating-point samples that are NaN or infinite, or beyond any recording's (at or above
    ``decode.MAX_SAMPLE_MAGNITUDE``): no level or feature of them means anything."""

    reason = "nonfinite"


class SilentAudio(AudioError):
    reason = "silent"


class TooShortAudio(AudioError):
    reason = "too_short"


class TooLongAudio(AudioError):
    """Longer (or larger) than the configured cap; rejected before it is decoded."""

    reason = "too_long"
