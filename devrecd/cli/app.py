"""The typer application, the grammar every command shares, and the one place where errors become exit codes.

Grammar (one name, one meaning):

- ``--torch-device auto|cpu|cuda|cuda:N``: where torch runs the frontend / network (backend.device);
  ``--input-device`` (listen): a sound card; ``--profile`` (enroll): a device profile in the registry.
- ``--out/-o``: where a command writes its results (a file or a folder, as its help says).
- ``--format table|json|csv``: how results are printed (``csv`` only where the output is tabular).
- ``--hop-seconds``, ``--window-seconds``: durations say their unit.
- ``--split train|val|test`` and ``--split-groups SPEC``: which recordings of a dataset are used.
- Choices are enums: a bad value is a usage error (exit 2), as is a bad configuration value.

Exit codes: 0 ok, 1 a file, artifact or step failed, 2 usage error or invalid configuration
(a value refused when the configuration is loaded), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import typer

from devrecd import __version__
from devrecd.backends import KINDS
from devrecd.errors import ConfigError, DevrecdError, UsageError, missing_extra
from devrecd.logs import printable

if TYPE_CHECKING:
    from devrecd.config import Config

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

app = typer.Typer(
    name="devrecd",
    help="Which recording device made this audio? Feature extraction, training, export, and a daemon that judges evidence.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="config.toml to load (defaults < file < DEVRECD_SECTION__KEY env < flags).",
    exists=True, dir_okay=False, readable=True,
)


class Format(str, enum.Enum):
    """How a command prints its results."""

    table = "table"
    json = "json"
    csv = "csv"


class TextFormat(str, enum.Enum):
    """``--format`` of commands whose output is not a table of rows (no csv)."""

    table = "table"
    json = "json"


# backend.kind: the backend registry's kinds (devrecd.backends.KINDS)
BackendKind = enum.Enum("BackendKind", {kind: kind for kind in KINDS}, type=str)


class SplitName(str, enum.Enum):
    """--split: which part of a dataset."""

    train = "train"
    val = "val"
    test = "test"


def choice(value: Optional[enum.Enum]) -> Optional[str]:
    """An enum option's value as the plain string the library takes (None stays None)."""
    return None if value is None else str(value.value)


TorchDeviceOption = typer.Option(None, "--torch-device", help="torch device for the frontend and the network: "
                                 "auto | cpu | cuda | cuda:N (backend.device).")
BackendOption = typer.Option(None, "--backend", case_sensitive=False, help="Inference backend (backend.kind).")
ModelOption = typer.Option(None, "--model", "-m", help="export/NAME.onnx (contract JSON beside it) or a checkpoint (backend.model).")
EngineOption = typer.Option(None, "--engine", help="TensorRT engine/X.plan (backend.engine).")
HopSecondsOption = typer.Option(None, "--hop-seconds", help="Window hop in seconds (audio.hop_seconds).")
SplitGroupsOption = typer.Option(
    None, "--split-groups",
    help="Split by recording group instead of the train.split ratios: 'ccnu' (segments 1-3 train, 4-5 test) "
         "or e.g. 'train=1,2 val=3 test=4,5'.")

_verbose = False  # set by the root callback (-v before the command), read by cli_logging


def _version(value: bool) -> None:
    if value:
        typer.echo(f"devrecd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level (give it before the command)."),
) -> None:
    """devrecd: recording-device identification for audio forensics."""
    global _verbose
    _verbose = verbose
    if verbose:
        logging.getLogger("devrecd").setLevel(logging.DEBUG)


def cli_logging(cfg: Config, *, quiet: bool = False) -> None:
    """Log as log.level / log.format say, DEBUG with ``devrecd -v``; ``quiet`` commands (whose
    results are their output) log only errors unless the configuration asks for DEBUG."""
    from devrecd.logs import setup_logging

    level = cfg.log.level
    if _verbose:
        level = "DEBUG"
    elif quiet and level in ("INFO", "WARNING"):
        level = "ERROR"
    setup_logging(level, cfg.log.format)


def command(*args: Any, **kwargs: Any) -> Callable:
    """``@app.command`` that turns a DevrecdError into one line on stderr and an exit code
    (UsageError 2, anything else 1) and Ctrl-C into exit code 130."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except DevrecdError as exc:
                typer.secho(f"error: {printable(exc)}", fg=typer.colors.RED, err=True)
                raise typer.Exit(code=EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED) from None
            except KeyboardInterrupt:
                typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
                raise typer.Exit(code=EXIT_INTERRUPTED) from None
            except ModuleNotFoundError as exc:  # an extra that is not installed: say which
                if (missing := missing_extra(exc)) is None:
                    raise
                typer.secho(f"error: {missing}", fg=typer.colors.RED, err=True)
                raise typer.Exit(code=EXIT_FAILED) from None

        return app.command(*args, **kwargs)(wrapper)

    return register


def load_cli_config(config: Optional[Path], overrides: dict[str, Any] | None = None) -> Config:
    """The configuration for a command: file (if any) + environment + flags that were given.
    A value the configuration refuses is a usage error (exit 2)."""
    from devrecd.config import load_config

    given = {k: (choice(v) if isinstance(v, enum.Enum) else v) for k, v in (overrides or {}).items() if v is not None}
    with option_values():
        return load_config(config, overrides=given)


@contextlib.contextmanager
def option_values() -> Iterator[None]:
    """Around code that applies a command's flags to the configuration (e.g. ``train_options``):
    a value it refuses (ConfigError) is a usage error, exit 2."""
    try:
        yield
    except UsageError:
        raise
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def audio_paths(paths: Iterable[Path], cfg: Config, *, what: str = "audio") -> list[Path]:
    """The recordings a command was given: files as named, folders expanded (recursively) to the
    audio files watch.extensions / watch.ignore_patterns select, as the daemon would take them."""
    from devrecd.audio.files import scan_files

    given = list(paths)
    files = scan_files(given, cfg.watch)
    if not files:
        raise UsageError(f"no {what} files found in {', '.join(map(str, given))} "
                          f"(extensions: {' '.join(cfg.watch.extensions)})")
    return files


class _NoBar:
    """What :func:`progress` returns when nothing is to be drawn."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "") -> None:
        pass

    def external_write_mode(self, file: object = None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(total: int, desc: str, unit: str = "file"):
    """A progress bar (tqdm) on stderr when stderr is a terminal; otherwise one that draws nothing
    (and a serving install without tqdm needs none)."""
    if not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr)


@contextlib.contextmanager
def logs_above_bars() -> Iterator[None]:
    """While a progress bar may be drawn (stderr is a terminal), devrecd's log lines are written
    above it (through tqdm) instead of onto the bar's line."""
    if not sys.stderr.isatty():
        yield
        return
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # no tqdm: no bars either
        yield
        return
    with logging_redirect_tqdm(loggers=[logging.getLogger("devrecd")]):
        yield


def main() -> None:
    """Console-script entry point."""
    from devrecd.logs import setup_logging

    setup_logging()
    app(prog_name="devrecd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
