"""The public surface: ``cflow.__all__`` resolves, import stays light, layering holds."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import cflow

SRC = Path(cflow.__file__).parent
ENTRY_POINT_PACKAGES = ("cflow.cli", "cflow.mcp")


def test_all_names_resolve() -> None:
    assert len(cflow.__all__) == len(set(cflow.__all__))
    for name in cflow.__all__:
        assert getattr(cflow, name) is not None, name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from cflow import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(cflow.__all__)


def test_public_members_are_defined_in_cflow() -> None:
    for name in cflow.__all__:
        value = getattr(cflow, name)
        module = getattr(value, "__module__", "cflow")
        assert module.startswith("cflow"), (name, module)


def test_the_facade_and_core_types_are_exported() -> None:
    from cflow.errors import __all__ as error_names
    from cflow.swarm import Swarm

    assert cflow.Swarm is Swarm
    assert set(error_names) <= set(cflow.__all__)
    for name in ("Event", "EventData", "TaskCreated", "TaskClaimed", "HybridClock", "Timestamp"):
        assert name in cflow.__all__


def test_version_matches_the_distribution() -> None:
    assert cflow.__version__ == importlib.metadata.version("cflow")


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = cflow.nope  # type: ignore[attr-defined]


def test_import_cflow_does_not_load_nats_or_duckdb() -> None:
    code = (
        "import sys, cflow; "
        "heavy = [m for m in ('nats', 'duckdb', 'docker', 'mcp', 'typer', 'cflow.streams')"
        " if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == ""
    lazy = subprocess.run([sys.executable, "-c", "import sys, cflow; cflow.Swarm; "
                           "print('nats' in sys.modules)"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert lazy.stdout.strip() == "True"


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module an import statement (or import_module call) in ``path`` names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts)
    return ".".join(parts[:-1])


def test_nothing_imports_the_cli_or_mcp_layers() -> None:
    offenders = []
    files = sorted(SRC.rglob("*.py"))
    assert files
    for path in files:
        package = _package_of(path)
        if any(package == p or package.startswith(p + ".") for p in ENTRY_POINT_PACKAGES):
            continue
        for lineno, module in _imported_modules(path, package):
            if any(module == p or module.startswith(p + ".") for p in ENTRY_POINT_PACKAGES):
                offenders.append(f"{path.relative_to(SRC.parent)}:{lineno} imports {module}")
    assert offenders == []


def test_the_layering_check_catches_offenders(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import cflow.cli\nfrom cflow.mcp import server\nfrom . import cli\n"
        "importlib.import_module('cflow.mcp.tools')\nfrom cflow import events\n"
    )
    modules = [m for _, m in _imported_modules(sample, "cflow")]
    assert "cflow.cli" in modules
    assert "cflow.mcp" in modules
    assert "cflow.cli" in [m for m in modules if m.startswith("cflow.cli")]
    assert "cflow.mcp.tools" in modules
