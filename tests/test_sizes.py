"""No god files and no god functions: every file of the package and of kernels/ stays under 400
lines, every function under 60 (from ``def`` to the end of its body), the algorithm cores that are
read next to their papers aside (STYLE.md: the GPTQ/SparseGPT loops, ~100 lines each)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE, MAX_FUNCTION = 400, 60
CORES = {("quantkit/methods/gptq.py", "gptq_quantize"), ("quantkit/methods/sparsegpt.py", "sparsegpt_prune")}


def _sources():
    return sorted([*(ROOT / "quantkit").rglob("*.py"), *(ROOT / "kernels").glob("*.[ch]")])


def long_functions(source: str, name: str) -> list[str]:
    """Functions of ``source`` (the file ``name``, relative to the repository) over the limit."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION and (name, node.name) not in CORES:
                out.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_file_over_400_lines():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE]
    assert not big, big


def test_no_function_over_60_lines():
    found = [f for p in _sources() if p.suffix == ".py" for f in long_functions(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, found


def test_the_checker_counts_a_long_function_and_exempts_only_the_cores():
    body = "def gptq_quantize():\n" + "    x = 1\n" * MAX_FUNCTION
    assert long_functions(body, "quantkit/x.py") == [f"quantkit/x.py:1 gptq_quantize ({MAX_FUNCTION + 1} lines)"]
    assert long_functions(body, "quantkit/methods/gptq.py") == []
    assert long_functions("def f():\n" + "    x = 1\n" * (MAX_FUNCTION - 1), "quantkit/x.py") == []
