"""The Typer app, its root options, and the entry point that turns library errors into one line."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from omnilabel import __version__
from omnilabel.cli.display import console, error_line, out
from omnilabel.errors import OmnilabelError

app = typer.Typer(
    name="omnilabel",
    help=(
        "Turn weak annotations (image-level tags, one point per object, boxes) into COCO instance "
        "pseudomasks, and train and evaluate the model that learns from them.\n\n"
        "Input and output are COCO JSON. Run `omnilabel COMMAND --help` for each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_state: dict[str, Any] = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"omnilabel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turn library errors into one line and exit code 1."""
    try:
        app(args=argv, standalone_mode=False)
    except OmnilabelError as exc:
        if _state["debug"]:
            raise
        console.print(error_line(str(exc)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # Usage errors (typer's bundled click): show the usage line and the problem, exit 2.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
