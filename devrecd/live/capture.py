"""Sound-card capture through sounddevice (PortAudio): device choice, rate choice, reopen with backoff.

The stream's callback does one thing: copy the block into a :class:`~devrecd.live.ring.SampleRing`
(and count what PortAudio reports as an input overflow). Everything else happens on other threads.
A supervisor thread opens the stream, watches it, and when the device disappears (the stream stops
with an error, opening fails, or no audio arrives for ``live.missing_after`` seconds) closes it and
tries again with exponential backoff, so unplugging a USB interface is survived, not a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from devrecd.errors import DevrecdError, MissingDependency
from devrecd.live.ring import CaptureRates, SampleRing

log = logging.getLogger("devrecd.live")

INSTALL_HINT = "pip install 'devrecd[live]' (sounddevice) and the PortAudio library (apt install libportaudio2)"


class InputUnavailable(DevrecdError):
    """The input device cannot be opened (missing, busy, or refuses every setting)."""

    reason = "live_input"


def sounddevice():
    """The sounddevice module, imported lazily (it loads PortAudio, which probes every device)."""
    try:
        import sounddevice as sd
    except ImportError as exc:  # not installed
        raise MissingDependency(f"live input needs sounddevice: {INSTALL_HINT} ({exc})") from None
    except OSError as exc:  # sounddevice installed, libportaudio missing
        raise MissingDependency(f"live input needs the PortAudio library: {INSTALL_HINT} ({exc})") from None
    return sd


def list_input_devices() -> list[dict[str, Any]]:
    """Every device PortAudio reports with input channels: index, name, host API, channels, default rate."""
    sd = sounddevice()
    apis = sd.query_hostapis()
    default_in = _default_input_index(sd)
    out = []
    for dev in sd.query_devices():
        if dev["max_input_channels"] <= 0:
            continue
        out.append({"index": dev["index"], "name": dev["name"], "hostapi": apis[dev["hostapi"]]["name"],
                    "channels": dev["max_input_channels"], "default_samplerate": dev["default_samplerate"],
                    "default": dev["index"] == default_in})
    return out


def _default_input_index(sd) -> int | None:
    idx = sd.default.device[0]
    if idx is None or idx < 0:
        try:
            idx = sd.query_devices(kind="input")["index"]
        except sd.PortAudioError:
            return None
    return int(idx)


def resolve_input(spec: str) -> dict[str, Any]:
    """The device for ``spec``: an index, an exact name, a unique name substring, or '' for the default.

    Raises :class:`InputUnavailable` when no input device matches, or several do.
    """
    devices = list_input_devices()
    if not devices:
        raise InputUnavailable("no audio input device found (PortAudio lists none)")
    spec = spec.strip()
    if not spec:
        chosen = [d for d in devices if d["default"]] or devices[:1]
        return chosen[0]
    if spec.isdigit():
        match = [d for d in devices if d["index"] == int(spec)]
    else:
        match = [d for d in devices if d["name"] == spec] or [d for d in devices if spec.lower() in d["name"].lower()]
    if len(match) == 1:
        return match[0]
    names = ", ".join(f"{d['index']}: {d['name']}" for d in devices)
    if not match:
        raise InputUnavailable(f"no input device matches {spec!r} (inputs: {names})")
    raise InputUnavailable(f"{spec!r} matches several input devices ({', '.join(d['name'] for d in match)}); "
                           "give its index or full name")


def choose_rate(device: int, model_rate: int, channels: int) -> int:
    """The capture rate: the model's rate when the device takes it, else the device's default."""
    sd = sounddevice()
    try:
        sd.check_input_settings(device=device, samplerate=model_rate, channels=channels, dtype="float32")
        return model_rate
    except sd.PortAudioError:
        rate = int(round(sd.query_devices(device)["default_samplerate"]))
    try:
        sd.check_input_settings(device=device, samplerate=rate, channels=channels, dtype="float32")
    except sd.PortAudioError as exc:
        raise InputUnavailable(f"input device {device} accepts neither {model_rate} Hz nor its default {rate} Hz: {exc}") from None
    return rate


@dataclass(frozen=True)
class InputInfo(CaptureRates):
    """What was opened, for the start-up log line and every verdict."""

    index: int
    name: str
    hostapi: str
    capture_rate: int
    model_rate: int
    channels: int


class Capture:
    """Keeps an input stream open into ``ring``; reopens with backoff when the device goes away.

    :meth:`callback` has sounddevice's signature ``(indata, frames, time, status)``.
    """

    def __init__(self, ring: SampleRing, *, device: str, model_rate: int, channels: int = 1,
                 blocksize: int = 0, missing_after: float = 10.0, backoff_max: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ring = ring
        self.device_spec = device
        self.model_rate = model_rate
        self.channels = channels
        self.blocksize = blocksize
        self.missing_after = missing_after
        self.backoff_max = backoff_max
        self.clock = clock
        self.info: InputInfo | None = None
        self.input_overflows = 0  # PortAudio's input_overflow flags (callback only)
        self.opens = 0  # successful opens (the first one and every reopen)
        self.failures = 0  # failed opens and lost streams
        self.last_error = ""
        self.last_data = 0.0  # monotonic time of the last block (callback only)
        self._stream = None
        self._opened_at = 0.0
        self._fed = False
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_open: Callable[[InputInfo], None] | None = None  # e.g. log + reset downstream state

    # --- the real-time path ---------------------------------------------------------------

    def callback(self, indata, frames: int, time_info, status) -> None:
        """PortAudio's callback: copy into the ring, count overflows; never blocks, never raises."""
        if status and status.input_overflow:
            self.input_overflows += 1
        now = self.clock()
        self.last_data = now
        self.ring.write(indata, now)

    def _finished(self) -> None:
        # PortAudio calls this when the stream stops for any reason (including a device error).
        if not self._stop.is_set():
            self._lost.set()

    # --- supervision ----------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """True while a stream is open (or fed) and audio arrived within ``missing_after`` seconds."""
        return (self._stream is not None or self._fed) and not self._lost.is_set() and \
            self.clock() - self.last_data <= self.missing_after

    def feed(self, rate: int, name: str = "fed") -> InputInfo:
        """Use the ring without PortAudio: the caller calls :meth:`callback` itself with audio at ``rate``
        (a program that gets its audio elsewhere; tests where no capture device exists)."""
        self.ring.mark_gap(rate)
        self.info = InputInfo(-1, name, "none", rate, self.model_rate, self.channels)
        self._fed = True
        self.last_data = self.clock()
        return self.info

    def open_once(self, *, rescan: bool = False) -> InputInfo:
        """Resolve the device, choose the rate, open and start the stream (raises InputUnavailable).

        ``rescan``: re-initialise PortAudio first. PortAudio lists devices once, when it starts, so
        a device that was unplugged and comes back (or appears late) is only found after a rescan.
        """
        sd = sounddevice()
        if rescan:
            sd._terminate()  # sounddevice's own re-initialisation pair; no other stream of ours is open
            sd._initialize()
        dev = resolve_input(self.device_spec)
        rate = choose_rate(dev["index"], self.model_rate, self.channels)
        try:
            stream = sd.InputStream(device=dev["index"], samplerate=rate, channels=self.channels, dtype="float32",
                                    blocksize=self.blocksize, callback=self.callback, finished_callback=self._finished)
            self._lost.clear()
            self.last_data = self.clock()  # the missing_after clock starts at the open
            # No callback runs yet: mark where this stream's audio (at this rate) begins in the ring.
            self.ring.mark_gap(rate)
            stream.start()
        except sd.PortAudioError as exc:
            raise InputUnavailable(f"cannot open input {dev['name']!r} at {rate} Hz: {exc}") from None
        self._stream = stream
        self._opened_at = self.clock()
        self.info = InputInfo(dev["index"], dev["name"], dev["hostapi"], rate, self.model_rate, self.channels)
        self.opens += 1
        return self.info

    def close(self) -> None:
        """Stop and close the stream (if any)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            # stop(), not abort(): PortAudio's ALSA abort cancels the callback thread (pthread_cancel),
            # which can kill the process if it lands while the callback runs Python code.
            stream.stop(ignore_errors=True)
            stream.close(ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - a vanished device may fail to close; it is gone either way
            log.debug("closing the input stream failed", extra={"error": str(exc)})

    def start(self) -> None:
        """Start the supervisor thread (opens the stream, reopens it when lost)."""
        sounddevice()  # fail now, with the install hint, rather than inside the thread
        self._stop.clear()
        self._thread = threading.Thread(target=self._supervise, name="devrecd-live-capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising and close the stream."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.close()

    def _supervise(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            if self._stream is None:
                try:
                    info = self.open_once(rescan=self.failures > 0)
                except (InputUnavailable, MissingDependency) as exc:
                    self.failures += 1
                    self.last_error = str(exc)
                    log.warning("live input unavailable, retrying", extra={"error": str(exc), "retry_s": delay})
                    self._stop.wait(delay)
                    delay = min(self.backoff_max, delay * 2)
                    continue
                log.info("live input open", extra={
                    "device": info.name, "index": info.index, "hostapi": info.hostapi, "capture_rate": info.capture_rate,
                    "model_rate": info.model_rate, "resampled": info.resampled, "reopens": self.opens - 1})
                if self.on_open is not None:
                    self.on_open(info)
            if self._stop.wait(0.1):
                break
            stale = self.clock() - self.last_data > self.missing_after
            if self._lost.is_set() or stale:
                self.failures += 1
                self.last_error = "input stream stopped" if self._lost.is_set() else \
                    f"no audio for {self.missing_after:.0f} s"
                log.warning("live input lost, reopening", extra={"error": self.last_error, "retry_s": delay})
                self.close()
                self._stop.wait(delay)
                delay = min(self.backoff_max, delay * 2)
            elif self.clock() - self._opened_at > 5.0:
                delay = 0.5  # healthy for a while: the next loss starts the backoff from the beginning
