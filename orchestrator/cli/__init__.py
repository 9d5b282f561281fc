"""The command line: a thin typer layer over the core. It parses, asks for confirmation, calls
the core and renders what it returns (through orchestrator.tui); only it and tui print.

common holds the app, the consoles, the options and the failure handling; each command module
registers its commands on that app when imported here.
"""

import sys

# Importing a command module registers its commands, in the order `--help` lists them.
from orchestrator.cli import observe, server, move, cockpit, tools  # noqa: F401  # isort: skip
from orchestrator.cli.common import app, embedded_argv, err

__all__ = ["app", "embedded_argv", "main"]


def main() -> None:
    """Entry point for the console script and `python -m orchestrator`."""
    try:
        app(args=embedded_argv(sys.argv[1:]))
    except KeyboardInterrupt:
        err.print("interrupted: every committed step is recorded; rerun the same command to resume")
        sys.exit(130)
