"""The layer rules of docs/design.md, read from the sources: Ray stays in jobs/, rich on the command line,
and the lower rooms never import the ones above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "omnilabel"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _files(room: str) -> list[Path]:
    target = PACKAGE / room
    return sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


def _importers(prefix: str) -> set[str]:
    """Files (relative to the package) that import ``prefix`` or a module under it."""
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if any(m == prefix or m.startswith(prefix + ".") for m in _imports(p))}


def test_ray_is_imported_only_under_jobs():
    assert {f for f in _importers("ray") if not f.startswith("jobs/")} == set()


def test_rich_is_imported_only_by_the_command_line():
    assert {f for f in _importers("rich") if not f.startswith("cli/")} == set()


@pytest.mark.parametrize("room", ["students", "teachers", "models", "data", "ops", "eval", "instances", "io",
                                  "errors", "events"])
def test_lower_rooms_import_neither_jobs_nor_the_command_line(room):
    for path in _files(room):
        bad = {m for m in _imports(path) for up in ("omnilabel.jobs", "omnilabel.cli", "rich", "ray")
               if m == up or m.startswith(up + ".")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_models_do_not_import_data_and_the_ground_floor_imports_nothing_above_it():
    for path in _files("models"):
        assert not {m for m in _imports(path) if m.startswith("omnilabel.data")}, path
    for name in ("io", "errors", "events"):
        above = {m for m in _imports(PACKAGE / f"{name}.py") if m.startswith("omnilabel.")} - {"omnilabel.errors"}
        assert not above, (name, above)


def test_ops_hold_no_models_and_no_files():
    for path in _files("ops"):
        assert not {m for m in _imports(path)
                    if m.split(".")[0] in ("segment_anything", "transformers", "open_clip")
                    or m.startswith(("omnilabel.io", "omnilabel.teachers", "omnilabel.models"))}, path
