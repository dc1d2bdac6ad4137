"""Functions over 60 lines and files over 400 lines in quantkit/ (the style guide's limits).

A function is measured with ``ast`` from its ``def`` line to the last line of its body
(decorators not counted); a file by its line count.  ``python tests/sizes.py`` prints both lists.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "quantkit"
MAX_FUNCTION, MAX_FILE = 60, 400


def long_functions(limit: int = MAX_FUNCTION) -> list[tuple[int, str]]:
    """``(lines, "path:line qualified.name")`` of every function longer than ``limit``, longest first."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        out += [(n, f"{path.relative_to(PKG.parent)}:{line} {name}") for n, line, name in _functions(path) if n > limit]
    return sorted(out, key=lambda x: -x[0])


def _functions(path: Path):
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child.end_lineno - child.lineno + 1, child.lineno, prefix + child.name
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(path.read_text(), str(path)), "")


def long_files(limit: int = MAX_FILE) -> list[tuple[int, str]]:
    """``(lines, path)`` of every file in quantkit/ longer than ``limit``, longest first."""
    sizes = [(len(p.read_text().splitlines()), str(p.relative_to(PKG.parent))) for p in sorted(PKG.rglob("*.py"))]
    return sorted((s for s in sizes if s[0] > limit), key=lambda x: -x[0])


if __name__ == "__main__":
    print(f"functions over {MAX_FUNCTION} lines:")
    for n, where in long_functions():
        print(f"  {n:4d}  {where}")
    print(f"files over {MAX_FILE} lines:")
    for n, where in long_files():
        print(f"  {n:4d}  {where}")
