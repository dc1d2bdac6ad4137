"""``python -m quantkit.cli``: the command line, as the ``quantkit`` script runs it."""

from quantkit.cli import main

main()
