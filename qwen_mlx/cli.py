"""The ``qwen-mlx`` command line: one click group; each command calls a library function.

User mistakes raise :class:`~qwen_mlx.errors.UserError`, shown as one ``Error:`` line with a
non-zero exit and no traceback.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from qwen_mlx import __version__, cli_distill, cli_models, cli_pairs, cli_replay
from qwen_mlx.backends import CHOICES
from qwen_mlx.cli_base import (
    ErrorLineGroup,
    config_option,
    console,
    default_config,
    err_console,
    preset_option,
    set_option,
)
from qwen_mlx.config import DataConfig, TrainingConfig
from qwen_mlx.review import command as review_command


@click.group(cls=ErrorLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwen-mlx")
def cli() -> None:
    """Fine-tune Qwen (Qwen2.5, Qwen3) on your own data and run it locally.

    \b
    Typical workflow:
      qwen-mlx download Qwen/Qwen2.5-3B     get the base model
      qwen-mlx check                        is everything ready?
      qwen-mlx train --preset full          LoRA/QLoRA (MLX on a Mac, PyTorch elsewhere)

    Every command has --help. Configuration lives in config.yaml (see `check`).
    """


for _command in cli_models.COMMANDS:
    cli.add_command(_command)
cli.add_command(review_command.review)


@cli.command()
@config_option
@preset_option
@set_option
def check(config_path: Path | None, preset: str | None, overrides: tuple[str, ...]) -> None:
    """Check that training can start: config, model files, data, backend, memory.

    Prints ✓ / ⚠ / ✗ per item with the fix. Exit 0 when ready, 1 when not.
    """
    from qwen_mlx.check import render, run_checks

    findings = run_checks(default_config(config_path), preset, overrides)
    if not render(findings, console):
        raise SystemExit(1)


@cli.command()
@click.argument("repo_id")
@click.option(
    "--local-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to put it (default: models/REPO_ID).",
)
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
def download(repo_id: str, local_dir: Path | None, revision: str | None) -> None:
    """Download a model from the Hugging Face Hub, e.g. Qwen/Qwen2.5-3B.

    Only the files a model needs; resumable (run it again after an interruption);
    HF_ENDPOINT selects a mirror (e.g. HF_ENDPOINT=https://hf-mirror.com).
    """
    from qwen_mlx.download import download as run_download

    path = run_download(repo_id, local_dir, revision)
    console.print(f"[green]✓[/] {repo_id} is complete in {path}")


@cli.group(cls=ErrorLineGroup)
def data() -> None:
    """Prepare and inspect datasets (jsonl/json/csv/parquet/txt; chat, sharegpt, alpaca, …)."""


data.add_command(cli_distill.data_distill)
data.add_command(cli_replay.data_replay)
data.add_command(cli_pairs.data_pairs)


SHOWN_BAD_RECORDS = 20


def _list_bad_records(problems: list, label: str, rest: str = "") -> None:
    """The first bad records, one ``file:line reason`` line each, on stderr."""
    for problem in problems[:SHOWN_BAD_RECORDS]:
        line = f"[yellow]{label}[/] {escape(str(problem))}"
        err_console.print(line, highlight=False, soft_wrap=True)  # one line per record
    if len(problems) > SHOWN_BAD_RECORDS:
        more = f"… and {len(problems) - SHOWN_BAD_RECORDS} more"
        err_console.print(f"{more} ({rest})" if rest else more, highlight=False)


@contextmanager
def _bad_records_listed(label: str):
    """When no record is usable, list the bad ones before the one-line error."""
    from qwen_mlx.dataprep import NothingUsable

    try:
        yield
    except NothingUsable as err:
        _list_bad_records(err.problems, label)
        raise


_preferences_option = click.option(
    "--sft-from-preferences",
    is_flag=True,
    help="Read preference data (chosen/rejected, KTO label) as SFT: the chosen answers only.",
)


def _fill_values(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    """``--fill name=value`` options as a dict."""
    out = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not (sep and name.strip()):
            raise click.BadParameter(f"{value!r}: expected NAME=VALUE, e.g. --fill name=报销助手")
        out[name.strip()] = text
    return out


@data.command("prepare")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("outputs/data"),
    show_default=True,
    help="Folder for train/valid/test.jsonl and report.json.",
)
@click.option(
    "--valid-ratio",
    type=click.FloatRange(0, 1, max_open=True),
    default=DataConfig.valid_ratio,
    show_default=True,
    help="Share of records for valid.jsonl.",
)
@click.option(
    "--test-ratio",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="Share of records held out in test.jsonl for `eval`.",
)
@click.option(
    "--seed", type=int, default=TrainingConfig.seed, show_default=True, help="Seed of the split."
)
@click.option("--strict", is_flag=True, help="Stop at the first bad record instead of skipping it.")
@_preferences_option
@click.option(
    "--fill",
    multiple=True,
    callback=_fill_values,
    metavar="NAME=VALUE",
    help="Value for the {{NAME}} placeholders in the records (repeatable).",
)
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    metavar="NAME",
    help="A dataset of the LLaMA-Factory dataset_info.json given as INPUT (repeatable).",
)
@click.option(
    "--from-grades",
    "from_grades",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="RUN",
    help="Also the corrected answers of RUN's graded eval report (`qwen-mlx review RUN`); "
    "writes from_grades.jsonl and the preference pairs.jsonl into -o (repeatable).",
)
def data_prepare(
    inputs: tuple[Path, ...],
    out_dir: Path,
    valid_ratio: float,
    test_ratio: float,
    seed: int,
    strict: bool,
    sft_from_preferences: bool,
    fill: dict[str, str],
    datasets: tuple[str, ...],
    from_grades: tuple[Path, ...],
) -> None:
    """Normalize INPUT files into chat JSONL and split them (seeded) into train/valid/test.

    Formats are detected per record: messages (OpenAI, with tools), conversations (sharegpt,
    with function_call/observation), conversation (Firefly), instruction/input/output,
    prompt/completion, prompt/response, query/response, text, and .txt paragraphs (lines, in a
    file without blank lines); a LLaMA-Factory dataset_info.json is read by --dataset NAME.
    Bad records are listed by file:line and skipped (or fatal with --strict); exact duplicates
    are removed. Each file written holds one format and none is empty (mlx-lm reads the folder).
    """
    from qwen_mlx.dataprep import prepare

    if not inputs and not from_grades:
        raise click.UsageError("give INPUT files, --from-grades RUN, or both")
    if from_grades:  # the corrected answers become one more input (qwen_mlx.review.grades)
        from qwen_mlx.review.grades import write_from_grades

        sft, n = write_from_grades(list(from_grades), out_dir, "data prepare")
        console.print(f"grades: {n['sft']} corrected answers, {n['pairs']} preference pairs")
        inputs = (*inputs, sft)
    with _bad_records_listed("skipped"):
        result = prepare(
            list(inputs),
            out_dir,
            valid_ratio=valid_ratio,
            test_ratio=test_ratio,
            seed=seed,
            strict=strict,
            from_preferences=sft_from_preferences,
            fill=fill,
            datasets=datasets,
        )
    _list_bad_records(result.report.problems, "skipped", "all in report.json")
    console.print(result.report.summary(), highlight=False)
    for warning in result.report.warnings():
        err_console.print(f"[yellow]warning[/] {escape(warning)}", highlight=False, soft_wrap=True)
    counts = ", ".join(f"{k} {v}" for k, v in result.files.items())  # empty splits: no file
    console.print(f"[green]✓[/] wrote {counts} → {out_dir}", highlight=False)


@data.command("stats")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Model folder whose tokenizer counts tokens (without it: characters only).",
)
@click.option(
    "--max-seq-length",
    type=click.IntRange(16),
    default=TrainingConfig.max_seq_length,
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@_preferences_option
def data_stats(
    path: Path,
    model_dir: Path | None,
    max_seq_length: int,
    as_json: bool,
    sft_from_preferences: bool,
) -> None:
    """Counts, formats, token-length percentiles and truncation at --max-seq-length."""
    from qwen_mlx.dataprep import stats

    with _bad_records_listed("bad record"):
        result = stats(path, model_dir, max_seq_length, sft_from_preferences)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"{path}", show_header=False)
    for key, value in result.items():
        if key == "problems":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key, str(value))
    console.print(table)
    _list_bad_records(result["problems"], "bad record", "see --json")


@cli.command()
@config_option
@click.option(
    "--backend",
    type=click.Choice(CHOICES),
    default=None,
    help="Trainer (default: training.backend from the config, normally auto).",
)
@preset_option
@set_option
@click.option(
    "--resume",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Continue an interrupted run from its last checkpoint (its folder). Only "
    "training.max_steps, eval_every and save_every may change.",
)
@click.option(
    "--from-adapter",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Start from this run's (or adapter folder's) adapter, e.g. an SFT run before "
    "training.objective dpo (then also the reference); sets training.from_adapter.",
)
def train(
    config_path: Path | None,
    backend: str | None,
    preset: str | None,
    overrides: tuple[str, ...],
    resume: Path | None,
    from_adapter: Path | None,
) -> None:
    """Train a LoRA adapter (QLoRA on a 4-bit base by default) on your data.

    The config is read in layers: built-in defaults, then config.yaml (or -c FILE), then
    --preset, then each --set. The run folder (output.dir) gets the resolved config.yaml,
    adapter/, checkpoints/ and metrics.jsonl. Run `qwen-mlx check` first.
    """
    from qwen_mlx.training_run import start

    # A resumed run starts from its own config.yaml; only an explicit -c is laid over it.
    config = config_path if resume is not None else default_config(config_path)
    if from_adapter is not None:  # JSON is YAML: the path stays one string whatever it holds
        overrides = (*overrides, f"training.from_adapter={json.dumps(str(from_adapter))}")
    start(config, backend, preset, overrides, resume, console)


def main() -> None:
    try:
        cli(prog_name="qwen-mlx")
    except SystemExit as done:
        from qwen_mlx.distill.teacher import exit_if_stopped

        exit_if_stopped(done)
        raise
