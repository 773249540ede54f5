"""Signals as :class:`threading.Event` s, never set from a Python signal handler.

A Python signal handler runs in the main thread between two bytecodes, which may be inside
``event.wait()`` while it holds the event's (non-reentrant) lock: an ``Event.set()`` in the handler
then waits for that lock forever. Seen once in CI: a daemon that logged nothing for 60 s after its
SIGTERM, on a loaded machine (tests/test_daemon.py recreates the moment). So the handlers installed
here do nothing; the C-level handler writes each signal's number to a pipe
(``signal.set_wakeup_fd``), and a thread of its own reads them and sets the events.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Mapping, Sequence


def _no_op(signum: int, frame: Any) -> None:
    """The Python-level handler of the relayed signals: the work is done by the relay thread."""


class SignalRelay:
    """``events``: signal number -> the event it sets; ``ignored``: signals set to SIG_IGN meanwhile.
    :meth:`install` from the main thread (elsewhere it does nothing and says so: an embedded caller
    sets the events itself), :meth:`restore` puts back what it replaced."""

    def __init__(self, events: Mapping[int, threading.Event], ignored: Sequence[int] = ()) -> None:
        self.events, self.ignored = dict(events), tuple(ignored)
        self._installed: tuple[int, dict[int, Any], Any] | None = None  # write end, handlers and wakeup fd replaced

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread() or self._installed is not None:
            return False
        read, write = os.pipe()
        os.set_blocking(write, False)
        # The pipe first: a signal between the two steps still reaches it (the other way round, its byte
        # went to the previous wakeup fd, normally none, and the signal was lost).
        wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, _no_op) for sig in self.events}
        previous.update({sig: signal.signal(sig, signal.SIG_IGN) for sig in self.ignored})
        self._installed = (write, previous, wakeup)
        threading.Thread(target=self._relay, args=(read,), name="devrecd-signals", daemon=True).start()
        return True

    def _relay(self, fd: int) -> None:
        """The signal numbers written to the pipe, as events; ends, closing its end of the pipe, when
        the write end is closed (:meth:`restore`)."""
        try:
            while data := os.read(fd, 64):
                for signum in data:
                    event = self.events.get(signum)
                    if event is not None:
                        event.set()
        finally:
            os.close(fd)

    def restore(self) -> None:
        if self._installed is None:
            return
        write, previous, wakeup = self._installed
        self._installed = None
        for sig, handler in previous.items():  # the handlers first, then the pipe (the reverse of install)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        current = signal.set_wakeup_fd(wakeup)
        if current != write:  # another's, installed after this one and still in use: left in place
            signal.set_wakeup_fd(current)
        os.close(write)  # the relay thread reads the end of the pipe, closes its own and returns

    @property
    def installed(self) -> bool:
        return self._installed is not None
