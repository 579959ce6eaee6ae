"""``qwen-mlx data distill``: the command line over :mod:`qwen_mlx.distill.run`.

Each option is also a ``distill.*`` key of config.yaml; an option given here wins over
``--set``, which wins over the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from qwen_mlx.cli_base import config_option, console, default_config, set_option


def _print_plan(estimate: dict) -> None:
    table = Table(title="distill plan (nothing sent)")
    for column in ("document", "characters", "chunks"):
        table.add_column(column, justify="left" if column == "document" else "right")
    for doc in estimate["documents"]:
        table.add_row(doc["file"], str(doc["characters"]), str(doc["chunks"]))
    console.print(table)
    kinds = ", ".join(f"{k} {n}" for k, n in estimate["requests_by_kind"].items() if n)
    console.print(
        f"{estimate['chunks']} chunks ({estimate['chunk_tokens']} tokens) → about "
        f"{estimate['requests']} requests, {estimate['prompt_tokens']} prompt and "
        f"{estimate['completion_tokens']} completion tokens (estimates): {kinds}",
        highlight=False,
    )


@click.command("distill")
@click.argument("docs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for train/test.jsonl, chunks, ledger and report.",
)
@click.option("--teacher-url", help="OpenAI-compatible URL, e.g. http://localhost:11434/v1.")
@click.option("--teacher-model", help="The teacher's model name, e.g. qwen2.5:32b.")
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="Environment variable with the key (default OPENAI_API_KEY).",
)
@click.option("--questions-per-chunk", type=int, help="Questions per chunk (default 5).")
@click.option("--chunk-tokens", type=int, help="Most tokens in a chunk (default 512).")
@click.option(
    "--test-ratio",
    type=float,
    help="Share of the question clusters held out in test.jsonl (default 0.1).",
)
@click.option(
    "--paraphrases",
    type=int,
    metavar="N",
    help="Rewordings of each training question, answered and checked (default 2; 0: none).",
)
@click.option(
    "--unanswerable-ratio",
    type=float,
    metavar="F",
    help="Questions the documents do not answer, as a share of the questions (default 0.1); "
    "each checked against the most similar chunks, answered with distill.refusal.",
)
@click.option("--concurrency", type=int, help="Requests in flight at once (default 4).")
@click.option(
    "--max-requests",
    type=int,
    help="Budget: at most N HTTP attempts (retries count; the ledger's replies are free).",
)
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML file overriding the prompt templates.",
)
@click.option(
    "--plan",
    "dry_run",
    is_flag=True,
    help="Only read and chunk: documents, chunks, estimated requests and tokens.",
)
@config_option
@set_option
def data_distill(docs, out_dir, dry_run, config_path, overrides, **options) -> None:
    """Distill rule documents (.md .txt .docx .pdf .html, or folders) into train/test Q&A.

    A teacher model (any OpenAI-compatible chat API: ollama, vLLM, DeepSeek, DashScope,
    OpenAI, `qwen-mlx serve`) writes questions for each chunk, answers them from the
    chunk alone, and checks each answer against it; it rewords the training questions
    (--paraphrases) and writes questions the documents leave open (--unanswerable-ratio),
    answered with a refusal once no similar chunk answers them. Near-duplicate questions
    form clusters that go whole to train or test. Every reply is kept in OUT/ledger.jsonl:
    run it again after an interruption and nothing is asked twice.
    """
    from qwen_mlx.config_file import load_config
    from qwen_mlx.distill.run import distill

    # Each option is its config key; JSON-quoted so YAML reads a model name as text.
    flags = [
        f"distill.{key}={json.dumps(str(v) if isinstance(v, Path) else v)}"
        for key, v in options.items()
        if v is not None
    ]
    cfg = load_config(default_config(config_path), None, [*overrides, *flags])
    result = distill(list(docs), out_dir, cfg, console, dry_run)
    if dry_run:
        _print_plan(result)
        return
    drops = ", ".join(f"{k} {v}" for k, v in result["drops"].items()) or "none"
    req = result["requests"]
    console.print(
        f"[green]✓[/] {result['records']['train']} train, {result['records']['test']} test "
        f"from {result['chunks']} chunks → {out_dir} ({req['sent']} requests sent in "
        f"{req['attempts']} HTTP attempts, {req['from_ledger']} from the ledger; "
        f"dropped: {drops})",
        highlight=False,
    )
