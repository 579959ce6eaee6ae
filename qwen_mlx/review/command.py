"""``qwen-mlx review``: the command line over :mod:`qwen_mlx.review.server`.

The server's options are ``serve``'s (host, port, allowed host names, API key, CORS), with
the same meaning; the server itself needs only the ``serve`` extra (no model is loaded).
"""

from __future__ import annotations

from pathlib import Path

import click

from qwen_mlx.cli_base import console, server_options
from qwen_mlx.errors import UserError


@click.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--reviewer",
    metavar="NAME",
    default=None,
    help="Record every decision under NAME (without it the page asks each person once).",
)
@click.option(
    "--only-reviewed",
    is_flag=True,
    help="The reviewed set holds only records someone accepted (default: all but rejected).",
)
@server_options(port=8001)
def review(
    target: Path,
    reviewer: str | None,
    only_reviewed: bool,
    host: str,
    port: int,
    allowed_hosts: tuple[str, ...],
    api_key: str | None,
    api_key_env: str | None,
    cors_origins: tuple[str, ...],
) -> None:
    """Check data or grade answers in the browser: a page at http://HOST:PORT/.

    \b
    TARGET a data folder (train/valid/test.jsonl, e.g. of `data distill`) or a data file:
      accept, edit or reject each record; the decisions go to review-ledger.jsonl beside
      the data and the reviewed set to reviewed/ (the data files are never changed).
    TARGET a run (or its eval/ folder): grade each answer of the eval report correct,
      partly or wrong, with the right answer; saved to RUN/eval/grades.jsonl, for
      `data prepare --from-grades RUN`.
    """
    try:
        from qwen_mlx.review.server import check_name, run
        from qwen_mlx.serve.server import api_key_of
    except ImportError as err:
        raise UserError(
            f"review needs the serve extra ({err.name} is missing): pip install -e '.[serve]'"
        ) from None
    if reviewer is not None:
        try:
            check_name(reviewer)
        except ValueError as err:
            raise UserError(f"--reviewer: {str(err).removeprefix('reviewer: ')}") from None
    options = {
        "reviewer": reviewer,
        "api_key": api_key_of(api_key, api_key_env),
        "cors_origins": cors_origins,
        "allowed_hosts": allowed_hosts,
        "only_reviewed": only_reviewed,
    }
    run(target, host, port, console, **options)
