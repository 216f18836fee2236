"""Entry point of the ``pertbench`` command.

Each command group lives in its own module with a ``register(app)`` function, so the
layout of ``cli/`` mirrors the package: data, evaluation, models, workflows, benchmark.
Commands import heavy libraries (torch, scanpy) inside their bodies to keep ``--help`` fast.
"""

from __future__ import annotations

import importlib
import sys
import traceback

import typer

from pertbench.errors import PertbenchError

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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 unexpected error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted anywhere on the command line
        argv = [a for a in argv if a != "--debug"]
    app = build_app()
    try:
        # standalone mode: the CLI framework handles --help, usage errors (exit 2) and
        # Ctrl-C itself and exits through SystemExit; our own errors propagate to here.
        app(args=argv, prog_name="pertbench", standalone_mode=True)
    except SystemExit as exc:
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
        typer.echo(f"error: {exc}", err=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: say so briefly, with the traceback on --debug
        if debug:
            traceback.print_exc()
        typer.echo(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            err=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
