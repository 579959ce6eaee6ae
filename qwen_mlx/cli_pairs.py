"""``qwen-mlx data pairs``: the command line over :mod:`qwen_mlx.pairs`."""

from __future__ import annotations

from pathlib import Path

import click

from qwen_mlx.backends import CHOICES
from qwen_mlx.cli_base import console, judge_options
from qwen_mlx.pairs import DEFAULT_THRESHOLD


@click.command("pairs")
@click.argument("run_or_adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Questions with reference answers (any data file qwen-mlx reads; kind: unanswerable "
    "marks those the rules do not answer).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The JSONL of preference pairs to write (TRL's conversational prompt/chosen/rejected).",
)
@judge_options
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Without a judge: an answer whose character ROUGE-L F1 against the reference is "
    "below this (0-1) is wrong and makes a pair.",
)
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option(
    "--backend", type=click.Choice(CHOICES), default="auto", show_default=True, help="Engine."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Questions answered together (default: 8, fewer where memory is short; 1: one by one).",
)
def data_pairs(
    run_or_adapter: Path,
    data: Path,
    out: Path,
    judge_url: str | None,
    judge_model: str | None,
    judge_key_env: str,
    threshold: float,
    max_tokens: int,
    backend: str,
    batch_size: int | None,
) -> None:
    """Preference pairs from the tuned model's own wrong answers, for DPO/ORPO.

    The run's tuned model answers every question of --data (greedy). Where the judge grades an
    answer wrong or partly right (or, without a judge, where its ROUGE-L against the reference
    is below --threshold), the pair is: reference = chosen, the model's answer = rejected. On a
    question the rules do not answer (kind: unanswerable), an answer that is not a refusal is
    rejected and the reference refusal chosen. Interrupted, the same command goes on where it
    stopped.
    """
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.eval.judge import judge_settings
    from qwen_mlx.pairs import make_pairs

    result = make_pairs(
        run_or_adapter,
        data,
        out,
        judge=judge_settings(judge_url, judge_model, judge_key_env),
        threshold=threshold,
        settings=GenerationSettings(max_tokens=max_tokens, temperature=0.0),
        backend=backend,
        batch_size=batch_size,
        console=console,
    )
    _print_counts(result)
    for note in result.notes:
        console.print(f"[yellow]⚠[/] {note}", highlight=False)
    reused = f" ({result.reused} answers from an earlier run)" if result.reused else ""
    console.print(
        f"[green]✓[/] wrote {result.pairs} preference pairs from {result.questions} "
        f"questions{reused} → {result.out}",
        highlight=False,
    )


def _print_counts(result) -> None:
    """One line per reason: how many answers, and whether they made pairs."""
    from qwen_mlx.pairs import PAIRED, REASONS

    console.print("answers by reason:", highlight=False)
    for reason, label in REASONS.items():
        if result.counts[reason]:
            made = " → pairs" if reason in PAIRED else ""
            console.print(f"  {result.counts[reason]:>6}  {label}{made}", highlight=False)
