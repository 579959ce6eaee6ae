"""``qwen-mlx data replay``: the command line over :mod:`qwen_mlx.replay`."""

from __future__ import annotations

from pathlib import Path

import click

from qwen_mlx.backends import CHOICES
from qwen_mlx.cli_base import console
from qwen_mlx.config import TrainingConfig


@click.command("replay")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The JSONL of replay records to write (then set data.replay_file to it).",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The base model folder (the one you tune), whose answers are replayed.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSONL of prompts (messages ending with a user turn, or prompt/instruction/question);"
    " default: the replay part of the general prompt set shipped with qwen-mlx.",
)
@click.option("-n", "count", type=click.IntRange(1), default=None, help="Answer N prompts only.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="0 answers greedily (the base's most likely answer).",
)
@click.option(
    "--backend", type=click.Choice(CHOICES), default="auto", show_default=True, help="Engine."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Prompts answered together (default: 8, fewer where memory is short; 1: one by one).",
)
@click.option("--seed", type=int, default=TrainingConfig.seed, show_default=True)
def data_replay(
    out: Path,
    model_dir: Path,
    prompts_file: Path | None,
    count: int | None,
    max_tokens: int,
    temperature: float,
    backend: str,
    batch_size: int | None,
    seed: int,
) -> None:
    """Have the base model answer general prompts, as training records that keep it general.

    Mix the file into training with data.replay_file (and data.replay_ratio, the share of the
    training tokens it takes, default 0.2): the tuned model then stays close to its base on
    writing, arithmetic, code and ordinary chat. Interrupted, the same command goes on where
    it stopped.
    """
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.replay import replay

    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature)
    result = replay(
        model_dir,
        out,
        prompts_file=prompts_file,
        n=count,
        settings=settings,
        backend=backend,
        seed=seed,
        batch_size=batch_size,
        console=console,
    )
    for note in result.notes:
        console.print(f"[yellow]⚠[/] {note}", highlight=False)
    reused = f" ({result.reused} from an earlier run)" if result.reused else ""
    console.print(
        f"[green]✓[/] wrote {result.written} replay records{reused} → {result.out}; train "
        f"with --set data.replay_file={result.out}",
        highlight=False,
    )
