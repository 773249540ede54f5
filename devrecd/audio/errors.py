"""Bad-input errors of audio intake, one type per reason.

``reason`` is the short label used in metrics (``devrecd_errors_total{reason}``) and the journal.
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


class MissingAudio(AudioError):
    reason = "missing"


class UnreadableAudio(AudioError):
    """Exists but cannot be opened for reading (permissions, a directory, an I/O error)."""

    reason = "unreadable"


class EmptyAudio(AudioError):
    """Zero bytes, or a valid container with no samples in it."""

    reason = "empty"


class CorruptAudio(AudioError):
    """Truncated or damaged: the container promises more than the file holds, or decoding fails."""

    reason = "corrupt"


class UnsupportedAudio(AudioError):
    """Not a format or codec any installed decoder reads."""

    reason = "unsupported"


class SilentAudio(AudioError):
    reason = "silent"


class TooShortAudio(AudioError):
    reason = "too_short"


class TooLongAudio(AudioError):
    """Longer (or larger) than the configured cap; rejected before it is decoded."""

    reason = "too_long"
