"""``python -m quantkit.serve MODEL ...``: the same as ``quantkit serve``."""

import sys

import click

from quantkit.errors import QuantkitError
from quantkit.serve import serve_command

try:
    serve_command.main(prog_name="python -m quantkit.serve", standalone_mode=False)
except QuantkitError as e:
    click.echo(f"Error: {e}", err=True)
    sys.exit(1)
except click.ClickException as e:
    e.show()
    sys.exit(e.exit_code)
except click.exceptions.Abort:
    sys.exit(130)
