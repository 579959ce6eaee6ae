"""What every ``qwen-mlx`` command module shares: the consoles, the error-line group and the
config options (``-c``, ``--preset``, ``--set``).

A module of its own so the command modules (:mod:`qwen_mlx.cli`, :mod:`qwen_mlx.cli_models`)
import it rather than each other.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from qwen_mlx.config import PRESETS
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


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Training config (default: ./config.yaml if present, else built-in defaults).",
)
preset_option = click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=None,
    help="The seed's presets: quick (1 epoch, lr 1e-4), full (3, 5e-5), "
    "enhanced (5, 3e-5, rank 32).",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config key, e.g. --set training.num_epochs=1 (repeatable).",
)


def default_config(path: Path | None) -> Path | None:
    if path is not None:
        return path
    return Path("config.yaml") if Path("config.yaml").is_file() else None
