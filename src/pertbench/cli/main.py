"""Entry point of the ``pertbench`` command.

Each command group lives in its own module with a ``register(app)`` function, so the
layout of ``cli/`` mirrors the package: data, evaluation, models, workflows, benchmark.
Commands import heavy libraries (torch, scanpy) inside their bodies to keep ``--help`` fast.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import typer

from pertbench.errors import PertbenchError, PertbenchWarning

COMMAND_MODULES = (
    "pertbench.cli.data_commands",
    "pertbench.cli.evaluate_command",
    "pertbench.cli.validation_command",
    "pertbench.cli.model_commands",
    "pertbench.cli.workflow_commands",
    "pertbench.cli.benchmark_commands",
)

EXIT_BAD_INPUT = 2


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="pertbench",
        help="Predict and benchmark single-cell responses to perturbations.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def _print_version(value: bool) -> None:
        if value:
            from pertbench import __version__

            typer.echo(f"pertbench {__version__}")
            raise typer.Exit(0)

    @app.callback()
    def _root(
        debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
        version: bool = typer.Option(
            False,
            "--version",
            help="Print the version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ) -> None:
        """Predict and benchmark single-cell responses to perturbations."""

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not part of this build
                continue
            raise
        module.register(app)
    return app


def one_line(text: object) -> str:
    """``text`` on one line: a message split over lines is joined with ``; ``."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    return "; ".join(parts)


#: Operating-system errors that come from the environment (permissions, a full or read-only
#: disk), not from a bug: reported like bad input.
ENVIRONMENT_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def _environment_message(exc: OSError) -> str:
    where = f" '{exc.filename}'" if exc.filename else ""
    reason = exc.strerror or type(exc).__name__
    return f"cannot use{where}: {reason}; check the path and its permissions"


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Print every Python warning (anndata, scanpy, ...) as one ``warning:`` line, once.

    Library warnings carry multi-line messages and source excerpts; the CLI's contract is
    one line per problem on stderr.
    """
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = one_line(message) or category.__name__
        if not issubclass(category, PertbenchWarning):
            origin = Path(str(filename)).parts
            library = next((p for p in origin if p in _LIBRARIES), None)
            text += f" ({category.__name__}" + (f" from {library})" if library else ")")
        if text in seen:
            return
        seen.add(text)
        typer.echo(f"warning: {text}", err=True)

    with warnings.catch_warnings():  # restores the filters and the printer afterwards
        warnings.showwarning = show
        yield


_LIBRARIES = ("anndata", "scanpy", "torch", "optuna", "pandas", "numpy", "scipy", "sklearn")
EXIT_TERMINATED = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_as_interrupt(received: list[int]) -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so a terminated command cleans up as after
    Ctrl-C (worker pools stopped, a tuning trial queued again, an empty new folder removed)."""

    def handler(signum, frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 unexpected error).

    Bad input (a :class:`PertbenchError`, or an operating-system error caused by the
    environment such as a read-only folder) prints one ``error:`` line and returns 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted anywhere on the command line
        argv = [a for a in argv if a != "--debug"]
    app = build_app()
    terminated: list[int] = []
    try:
        # standalone mode: the CLI framework handles --help, usage errors (exit 2) and
        # Ctrl-C itself and exits through SystemExit; our own errors propagate to here.
        with _warnings_as_lines(), _sigterm_as_interrupt(terminated):
            app(args=argv, prog_name="pertbench", standalone_mode=True)
    except SystemExit as exc:
        if terminated:
            typer.echo("terminated", err=True)
            return EXIT_TERMINATED
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        typer.echo(str(code), err=True)
        return 1
    except PertbenchError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {one_line(exc)}", err=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except OSError as exc:
        if debug:
            traceback.print_exc()
        if exc.errno in ENVIRONMENT_ERRNOS:
            typer.echo(f"error: {one_line(_environment_message(exc))}", err=True)
            return EXIT_BAD_INPUT
        typer.echo(_internal(exc), err=True)
        return 1
    except Exception as exc:  # a bug: say so briefly, with the traceback on --debug
        if debug:
            traceback.print_exc()
        typer.echo(_internal(exc), err=True)
        return 1
    return 0


def _internal(exc: BaseException) -> str:
    return one_line(
        f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
    )


if __name__ == "__main__":
    sys.exit(main())
