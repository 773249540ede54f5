"""The typer application, shared options, and the one place where errors become exit codes."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from devrecd import __version__
from devrecd.errors import DevrecdError, missing_extra

app = typer.Typer(
    name="devrecd",
    help="Which recording device made this audio? Feature extraction, training, export, and a daemon that judges evidence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="config.toml to load (defaults < file < DEVRECD_SECTION__KEY env < flags).",
    exists=True, dir_okay=False, readable=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"devrecd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    """devrecd: recording-device identification for audio forensics."""
    if verbose:
        logging.getLogger("devrecd").setLevel(logging.DEBUG)


def command(*args: Any, **kwargs: Any) -> Callable:
    """``@app.command`` that turns a DevrecdError into one line on stderr and exit code 1."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except DevrecdError as exc:
                typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
                raise typer.Exit(code=1) from None
            except ModuleNotFoundError as exc:  # an extra that is not installed: say which
                if (missing := missing_extra(exc)) is None:
                    raise
                typer.secho(f"error: {missing}", fg=typer.colors.RED, err=True)
                raise typer.Exit(code=1) from None

        return app.command(*args, **kwargs)(wrapper)

    return register


def load_cli_config(config: Optional[Path], overrides: dict[str, Any] | None = None):
    """The configuration for a command: file (if any) + environment + flags that were given."""
    from devrecd.config import load_config

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return load_config(config, overrides=given)


def main() -> None:
    """Console-script entry point."""
    from devrecd.logs import setup_logging

    setup_logging()
    app(prog_name="devrecd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
