"""What every ``qwen-mlx`` command module shares: the consoles and the error-line group.

A module of its own so the command modules (:mod:`qwen_mlx.cli`, :mod:`qwen_mlx.cli_models`)
import it rather than each other.
"""

from __future__ import annotations

import click
from rich.console import Console

from qwen_mlx.errors import UserError

console = Console()
err_console = Console(stderr=True)


class ErrorLineGroup(click.Group):
    """A click group that turns UserError into a clean one-line error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            clean = click.ClickException(str(err))
            clean.exit_code = err.exit_code
            raise clean from None
