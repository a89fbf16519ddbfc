"""The package's layout and import directions are those of shared/notes/architecture.md: the pipeline's rooms
(config → data → modeling → training → checkpoint), inference, serve and eval beside them, cli above all; and the
directions that keep each room easy to change. Read from the source (every import, at any depth), not by importing."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "instructune"
TOP_LEVEL = {"__init__", "errors", "files", "run_summary"}  # what may sit loose at the package's top
# (importing room, imported room): directions the note rules out
FORBIDDEN = {
    ("data", "training"), ("data", "checkpoint"), ("data", "modeling"),  # data knows nothing of models or distribution
    ("checkpoint", "data"), ("checkpoint", "training"),
    ("inference", "training"),  # nor of what export writes: the run summary's contract is run_summary.py
    ("modeling", "data"), ("modeling", "training"),
    ("config", "training"),  # the planner is asked after parsing, not during it
    ("eval", "training"), ("serve", "training"),
}


def room(module: str) -> str:
    """instructune.data.cache → data; instructune.errors → errors."""
    return module.split(".")[1] if module.count(".") else module


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(), ".".join(path.relative_to(REPO).with_suffix("").parts[:-1]))


def imports_in(source: str, package: str) -> set[str]:
    """The instructune modules a module of `package` imports, anywhere in it (functions too), relative ones resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "instructune" or name.startswith("instructune.")}


def test_only_a_few_modules_sit_at_the_top():
    assert {p.stem for p in PACKAGE.glob("*.py")} <= TOP_LEVEL


def test_nothing_imports_the_cli():
    for path in PACKAGE.rglob("*.py"):
        if "cli" not in path.relative_to(PACKAGE).parts:
            assert not {m for m in imports_of(path) if room(m) == "cli"}, path


def test_the_import_directions_of_the_architecture_note():
    broken = []
    for path in PACKAGE.rglob("*.py"):
        source = room(".".join(path.relative_to(REPO).with_suffix("").parts))
        for module in imports_of(path):
            if (source, room(module)) in FORBIDDEN:
                broken.append(f"{path.relative_to(REPO)} imports {module}")
    assert not broken, "\n".join(broken)


def test_the_walk_sees_imports_at_any_depth():
    """The checker itself: an import inside a function and a relative import are both seen."""
    source = "import os\ndef f():\n    from instructune.training import recipe\nfrom ..checkpoint import shard\n"
    assert imports_in(source, "instructune.data") == {"instructune.training", "instructune.training.recipe",
                                                      "instructune.checkpoint", "instructune.checkpoint.shard"}
