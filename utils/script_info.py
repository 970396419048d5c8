"""What a visual_*.py declares, read from its source with `ast` (no import, no side effects).

The batch runner, the notebook generator and the record-kind matrix use this to run each script
as its own command line would: its DEMO_ARGS, DEMO_MPI_RANKS and the default split it hands to
utils.cli.main.
"""
import ast
from pathlib import Path


def declared_constant(script: Path, name: str, default=None):
    for node in ast.parse(Path(script).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    return default


def declared_default_split(script: Path, default: str = "clean_test") -> str:
    for node in ast.walk(ast.parse(Path(script).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main":
            for keyword in node.keywords:
                if keyword.arg == "default_split":
                    return ast.literal_eval(keyword.value)
    return default


def flags_to_kwargs(flags) -> dict:
    """["--n_sub", "600", "--x=-1:1:5", "--quiet"] -> {"n_sub": "600", "x": "-1:1:5", "quiet": True}."""
    values, key = {}, None
    for item in map(str, flags):
        if item.startswith("--"):
            name, eq, value = item[2:].partition("=")
            key = None if eq else name
            values[name] = value if eq else True
        elif key is not None:
            values[key] = item
            key = None
    return values
