"""The package follows the data path: every module imports only its own stage and earlier ones, and
the import graph has no cycle, imports inside functions included (they hide a cycle, they do not
remove it).  The stages, in order, are the folders of quantkit/ (README, Design)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "quantkit"

# stage name -> the modules (and packages, with everything below them) in it, in data-path order
# The package's __init__ sits with the API: it registers quantkit's transformers quantizer
# (quantkit.checkpoint.hf), importing it only when transformers' quantizer table is imported.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("quantkit.errors", "quantkit.memory", "quantkit.devices")),
    ("models", ("quantkit.models",)),
    ("data", ("quantkit.data",)),
    ("core", ("quantkit.core",)),
    ("calibrate", ("quantkit.calibrate",)),
    ("methods", ("quantkit.registry", "quantkit.methods")),
    ("pack", ("quantkit.pack",)),
    ("kernels", ("quantkit.kernels",)),
    ("runtime", ("quantkit.runtime",)),
    ("checkpoint", ("quantkit.checkpoint",)),
    ("api", ("quantkit", "quantkit.api", "quantkit.recipe", "quantkit.distill", "quantkit.testing")),
    ("eval", ("quantkit.eval",)),
    ("serve", ("quantkit.serve",)),
    ("cli", ("quantkit.cli", "quantkit.eval.tables", "quantkit.eval.quickstart")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """quantkit modules that ``path`` imports anywhere in its body (a package's ``__init__`` counts
    when a name is taken from it; ``from pkg import submodule`` is an import of the submodule)."""
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("quantkit"):
                    out.add(_known(a.name, modules))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = me.split(".") if is_pkg else me.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("quantkit"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else _known(base, modules))
    out.discard(me)
    return out


def _known(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def stage_of(module: str) -> int:
    best, index = -1, None
    for i, (_, members) in enumerate(STAGES):
        for m in members:
            if (module == m or module.startswith(m + ".")) and len(m) > best:
                best, index = len(m), i
    assert index is not None, f"{module} is in no stage: add it to STAGES"
    return index


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def back_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({STAGES[stage_of(a)][0]}) -> {b} ({STAGES[stage_of(b)][0]})"
                  for a, targets in g.items() for b in targets if stage_of(b) > stage_of(a))


def test_every_module_has_a_stage():
    for m in all_modules():
        stage_of(m)


def test_import_graph_has_no_cycle():
    found = cycles(graph())
    assert not found, "import cycles (imports inside functions included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_imports_a_later_stage():
    found = back_imports(graph())
    assert not found, "imports of a later stage:\n" + "\n".join(found)


def test_the_checker_sees_cycles_and_back_imports(tmp_path):
    """The checker itself can fail: an in-function import that closes a cycle and runs back up a stage."""
    g = {"quantkit.core.quant": {"quantkit.runtime.qlinear"}, "quantkit.runtime.qlinear": {"quantkit.core.quant"}}
    assert cycles(g) == [["quantkit.core.quant", "quantkit.runtime.qlinear"]]
    assert back_imports(g) == ["quantkit.core.quant (core) -> quantkit.runtime.qlinear (runtime)"]
    src = PKG / "core" / "quant.py"  # a real module's path, so its name resolves; its text comes from here:
    tree = "def f():\n    from quantkit.runtime import qlinear\n    import quantkit.calibrate.driver as d\n"
    mods = {"quantkit.runtime.qlinear": src, "quantkit.calibrate.driver": src, "quantkit.core.quant": src}
    original = Path.read_text
    try:
        Path.read_text = lambda self, *a, **k: tree if self == src else original(self, *a, **k)
        assert imports_of(src, mods) == {"quantkit.runtime.qlinear", "quantkit.calibrate.driver"}
    finally:
        Path.read_text = original
