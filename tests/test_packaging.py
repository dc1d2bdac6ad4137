"""A fresh install works from the repository root: no top-level folder shadows an installed
distribution (transformers imports the PyPI package ``kernels``), the wheel lists every package,
and the commands the README runs start there and load a model."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "tests" / "fixtures" / "stories260K"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run_at_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _top_level_entries() -> list[Path]:
    """What the repository holds at its root (git's view where it is a checkout: build outputs and
    virtual environments that .gitignore names are not the repository)."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return sorted(ROOT.iterdir())
    return sorted({ROOT / n.split("/")[0] for n in names if (ROOT / n).exists()})


def test_only_quantkit_is_importable_from_the_repository_root():
    """Every other top-level name is a folder without Python in it: even when the repository root is
    on sys.path (``python -m`` from the root), ``import kernels`` / ``import eval`` / ``import recipes``
    reach the installed distributions, never these folders."""
    offenders = []
    for entry in _top_level_entries():
        if entry.name.startswith(".") or entry.name == "quantkit" or not entry.name.replace(".py", "").isidentifier():
            continue
        if entry.is_file() and entry.suffix == ".py":
            offenders.append(entry.name)
        elif entry.is_dir() and entry.name not in ("tests",) and any(entry.rglob("*.py")):
            offenders.append(f"{entry.name}/ holds Python")
        elif entry.is_dir() and (entry / "__init__.py").exists():
            offenders.append(f"{entry.name}/__init__.py")
    assert not offenders, offenders
    assert not any(ROOT.joinpath("tests").rglob("__init__.py")), "tests/ must not be a package (pytest uses importlib mode)"


def test_pyproject_lists_every_package_and_ships_the_kernel_sources():
    cfg = _pyproject()["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quantkit").rglob("__init__.py")}
    listed = set(cfg["packages"])
    assert on_disk <= listed, f"missing from pyproject's packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == {"quantkit.kernels.csrc"}
    assert cfg["package-dir"] == {"quantkit.kernels.csrc": "kernels"}
    assert sorted(p.name for p in (ROOT / "kernels").glob("*.c"))
    from quantkit.kernels.native import build

    assert build.SOURCE_DIR in (ROOT / "kernels", Path(build.__file__).parents[1] / "csrc")
    assert all(p.is_file() and p.parent == build.SOURCE_DIR for p in (*build.HEADERS, *build.SOURCES))


def test_bounded_dependencies_match_the_constraints_file():
    """torch, transformers and gguf (whose internals quantkit uses) have both bounds, and the exact
    versions in constraints.txt lie inside them."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = {canonicalize_name(Requirement(r).name): Requirement(r) for r in _pyproject()["project"]["dependencies"]}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for name in ("torch", "transformers", "gguf"):
        ops = {s.operator for s in reqs[name].specifier}
        assert {">=", "<"} <= ops, f"{name} needs a lower and an upper bound: {reqs[name]}"
    for name, req in reqs.items():
        if req.marker is None or req.marker.evaluate():
            assert name in pins, f"constraints.txt does not pin {name}"
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="the PyPI `kernels` distribution is not installed")
def test_commands_start_and_load_a_model_from_the_repository_root():
    """The README's commands run ``python -m`` from the root, which puts the root on sys.path."""
    dist = importlib.metadata.distribution("kernels")
    probe = _run_at_root("-c", "import kernels, sys; print(kernels.__file__)")
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).resolve().is_relative_to(Path(dist.locate_file("")).resolve())
    for args in (("-m", "quantkit.cli", "--help"), ("-m", "quantkit.eval.quickstart", "--help")):
        r = _run_at_root(*args)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-2000:]
    r = _run_at_root("-m", "quantkit.cli", "eval", "perplexity", str(STORIES), "--dataset",
                     str(ROOT / "tests" / "fixtures" / "tinystories.txt"), "--seqlen", "64", "--max-windows", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"perplexity"' in r.stdout
