"""systemd ``Type=notify`` support, written by hand (one datagram on ``$NOTIFY_SOCKET``).

WATCHDOG pings come from the pipeline's own progress: every stage stamps :class:`~devrecd.pipeline.runner.Liveness` when it
finishes a step, and the idle inference loop stamps it while nothing is in flight. The pinger sends
``WATCHDOG=1`` only while that stamp is recent, so a stuck pipeline stops the pings and systemd
restarts the service (a timer that pinged regardless would hide the hang).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

from devrecd.pipeline.runner import Liveness

log = logging.getLogger("devrecd.notify")


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not run under systemd."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("sd_notify failed", extra={"state": state.split("=", 1)[0], "error": str(exc)})
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when systemd set no watchdog."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


class WatchdogPinger:
    """Pings systemd every ``interval`` s while ``liveness`` is younger than ``max_age`` s."""

    def __init__(self, liveness: Liveness, interval: float, max_age: float,
                 send: Callable[[str], bool] = notify) -> None:
        self.liveness, self.interval, self.max_age, self.send = liveness, interval, max_age, send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="devrecd-watchdog", daemon=True)
        self.missed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.liveness.age() <= self.max_age:
                self.send("WATCHDOG=1")
            else:
                self.missed += 1
                log.error("pipeline made no progress, withholding the watchdog ping",
                          extra={"stalled_s": round(self.liveness.age(), 1)})
