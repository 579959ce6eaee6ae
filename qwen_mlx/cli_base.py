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


def judge_options(command):
    """A judge model's options (``eval``, ``data pairs``): its URL, model name and key."""
    for option in reversed(
        [
            click.option(
                "--judge-url", help="OpenAI-compatible URL of a model that grades each answer."
            ),
            click.option("--judge-model", help="The judge's model name (with --judge-url)."),
            click.option(
                "--judge-key-env",
                metavar="VAR",
                default="OPENAI_API_KEY",
                show_default=True,
                help="Environment variable with the judge's key (a local judge may have none).",
            ),
        ]
    ):
        command = option(command)
    return command


def server_options(port: int):
    """The options of a command that serves pages and an API (``serve``, ``review``): where it
    listens, the host names it answers, its key and the origins allowed to call it; one
    definition so the two servers keep one meaning."""
    options = [
        click.option(
            "--host", default="127.0.0.1", show_default=True, help="Address to listen on."
        ),
        click.option("--port", type=click.IntRange(1, 65535), default=port, show_default=True),
        click.option(
            "--allowed-host",
            "allowed_hosts",
            multiple=True,
            metavar="NAME",
            help="Also answer requests whose Host header names NAME (repeatable; '*': any). "
            "Without it only localhost, IP addresses (so 0.0.0.0 works for clients using the "
            "machine's address) and --host itself are answered; other names get 403 (DNS "
            "rebinding guard).",
        ),
        click.option(
            "--api-key",
            default=None,
            help="Require 'Authorization: Bearer KEY' (visible in ps: prefer --api-key-env).",
        ),
        click.option(
            "--api-key-env",
            metavar="VAR",
            default=None,
            help="Like --api-key, the key read from the environment variable VAR.",
        ),
        click.option(
            "--cors-origin",
            "cors_origins",
            multiple=True,
            metavar="ORIGIN",
            help="Let web pages from ORIGIN (e.g. http://localhost:3000) call the server "
            "(repeatable).",
        ),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply
