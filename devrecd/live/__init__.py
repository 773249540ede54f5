"""Live input: a sound card's audio judged window by window (``devrecd listen``, or inside ``devrecd watch``).

capture (PortAudio callback -> :class:`~devrecd.live.ring.SampleRing`) -> :class:`~devrecd.live.windower.Windower`
(mono, model rate, windows, level) -> frontend -> batcher -> backend -> window verdict + running verdict.
sounddevice is imported only when a stream is opened.
"""

from devrecd.live.capture import Capture, InputInfo, InputUnavailable, list_input_devices, resolve_input
from devrecd.audio.levels import Level, measure
from devrecd.live.recorder import SegmentRecorder
from devrecd.live.ring import SampleRing
from devrecd.live.smoothing import Running, RunningFeatures, RunningVerdict
from devrecd.live.source import Listener, LiveSource, window_sizes
from devrecd.live.windower import LiveWindow, Windower

__all__ = [
    "Capture", "InputInfo", "InputUnavailable", "Level", "Listener", "LiveSource", "LiveWindow", "Running", "RunningFeatures",
    "RunningVerdict", "SampleRing", "SegmentRecorder", "Windower", "list_input_devices", "measure",
    "resolve_input", "window_sizes",
]
