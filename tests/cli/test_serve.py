"""``generate`` and ``serve`` are quantkit.cli commands; quantkit.serve (an earlier stage) does not
import the command line, and the command line imports no torch until a command runs."""

import subprocess
import sys

from click.testing import CliRunner

from quantkit.cli import cli


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_serve_package_does_not_import_the_cli_and_the_cli_imports_no_torch():
    assert not any(m.startswith("quantkit.cli") for m in _modules_after("import quantkit.serve"))
    loaded = _modules_after("import quantkit.cli")
    assert "torch" not in loaded and "quantkit.methods" not in loaded and "quantkit.data" not in loaded


def test_serve_and_generate_are_commands_of_the_cli():
    for name in ("serve", "generate"):
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "--kv-bits" in r.output
