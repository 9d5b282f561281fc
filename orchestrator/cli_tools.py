"""Commands for the steps around a move (audit, init, verify-access, scan-code, compat-usage).

`register(app)` adds them to the main CLI; like cli.py, this layer only calls the core.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the audit and scaffolding commands to the CLI."""
