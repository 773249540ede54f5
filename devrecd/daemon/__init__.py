"""The daemon: the host of :mod:`devrecd.pipeline` (``devrecd watch``).

``service`` (Daemon: state-folder lock, sources, HTTP, notify, signals, reload), ``watcher``
(folders: inotify with a polling fallback, file stability), ``http`` (metrics, health, readiness),
``notify`` (systemd READY/WATCHDOG).
"""
