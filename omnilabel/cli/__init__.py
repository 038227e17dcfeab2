"""The ``omnilabel`` command line: one thin Typer command per user command.

Every command parses its flags, builds the library's configs (``JobOptions`` from the shared job flags of
``options``), calls one library function and prints what it returns (``display``, the only place that knows
rich). Library errors (``OmnilabelError``) become one readable line on stderr and exit code 1; ``--debug``
shows the traceback instead.
"""
# ruff: noqa: I001  (the import order is the order of the commands in --help)

from omnilabel.cli.app import app, main
from omnilabel.cli import data, teacher, entities, prompter, stability, student, review, weights  # noqa: F401  (registers the commands)

__all__ = ["app", "main"]
