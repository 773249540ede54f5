"""What ``devrecd install-service`` installs, as package data: the systemd unit and its sysusers,
tmpfiles and env files, the default ``config.toml`` and the operations guide.

In the source tree these are links to ``systemd/*``, ``config.toml`` and ``docs/operations.md`` (one
copy of each); a wheel holds their contents. Read them with ``importlib.resources.files(__name__)``.
"""
