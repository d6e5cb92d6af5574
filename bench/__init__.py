"""cflow benchmarks: every figure next to a baseline measured in the same run.

Run with ``uv run python -m bench [--quick] [--only NAME] [--out FILE]`` or
``uv run cfctl bench``. See ``bench/__main__.py`` for the sections.
"""
