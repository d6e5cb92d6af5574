"""Build hook: an editable install (``uv sync``, ``uv run``) compiles cflow's sources to
bytecode, as installing a wheel compiles what it installs.

The editable install only points at ``src/``, so without this every ``cfctl`` start
compiles the modules it imports whenever bytecode is not written at run time
(``PYTHONDONTWRITEBYTECODE``, read-only checkouts): about 90 ms of a cold start
(issue 18). A source edited later makes its ``.pyc`` stale, and Python ignores it.
"""

from __future__ import annotations

import compileall
import py_compile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CompileSources(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            compileall.compile_dir(Path(self.root) / "src" / "cflow", quiet=1,
                                   invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
