"""The ``qwen-mlx`` command line: one click group; each command calls a library function.

User mistakes raise :class:`~qwen_mlx.errors.UserError`, shown as one ``Error:`` line with a
non-zero exit and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from qwen_mlx import __version__
from qwen_mlx.backends import CHOICES
from qwen_mlx.config import PRESETS
from qwen_mlx.errors import UserError

console = Console()
err_console = Console(stderr=True)


class _Group(click.Group):
    """A click group that turns UserError into a clean one-line error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            clean = click.ClickException(str(err))
            clean.exit_code = err.exit_code
            raise clean from None


_config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Training config (default: ./config.yaml if present, else built-in defaults).",
)
_preset_option = click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=None,
    help="The seed's presets: quick (1 epoch, lr 1e-4), full (3, 5e-5), "
    "enhanced (5, 3e-5, rank 32).",
)
_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config key, e.g. --set training.num_epochs=1 (repeatable).",
)


def _default_config(path: Path | None) -> Path | None:
    if path is not None:
        return path
    return Path("config.yaml") if Path("config.yaml").is_file() else None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwen-mlx")
def cli() -> None:
    """Fine-tune Qwen2.5 on your own data and run it locally.

    \b
    Typical workflow:
      qwen-mlx download Qwen/Qwen2.5-3B     get the base model
      qwen-mlx check                        is everything ready?
      qwen-mlx train --preset full          LoRA/QLoRA (MLX on a Mac, PyTorch elsewhere)

    Every command has --help. Configuration lives in config.yaml (see `check`).
    """


@cli.command()
@_config_option
@_preset_option
@_set_option
def check(config_path: Path | None, preset: str | None, overrides: tuple[str, ...]) -> None:
    """Check that training can start: config, model files, data, backend, memory.

    Prints ✓ / ⚠ / ✗ per item with the fix. Exit 0 when ready, 1 when not.
    """
    from qwen_mlx.check import render, run_checks

    findings = run_checks(_default_config(config_path), preset, overrides)
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


@cli.group(cls=_Group)
def data() -> None:
    """Prepare and inspect datasets (jsonl/json/csv/parquet; alpaca, chat, sharegpt, …)."""


@data.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
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
    default=0.05,
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
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the split.")
@click.option("--strict", is_flag=True, help="Stop at the first bad record instead of skipping it.")
def data_prepare(
    inputs: tuple[Path, ...],
    out_dir: Path,
    valid_ratio: float,
    test_ratio: float,
    seed: int,
    strict: bool,
) -> None:
    """Normalize INPUT files into chat JSONL and split them (seeded) into train/valid/test.

    Formats are detected per record: instruction/input/output (+system, history), messages,
    conversations (sharegpt), prompt/completion, text. Bad records are listed by file:line
    and skipped (or fatal with --strict); exact duplicates are removed.
    """
    from qwen_mlx.dataprep import prepare

    result = prepare(
        list(inputs),
        out_dir,
        valid_ratio=valid_ratio,
        test_ratio=test_ratio,
        seed=seed,
        strict=strict,
    )
    for problem in result.report.problems[:20]:
        err_console.print(f"[yellow]skipped[/] {problem}", highlight=False)
    if result.report.skipped > 20:
        err_console.print(f"… and {result.report.skipped - 20} more (all in report.json)")
    console.print(result.report.summary(), highlight=False)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
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
@click.option("--max-seq-length", type=click.IntRange(16), default=1024, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def data_stats(path: Path, model_dir: Path | None, max_seq_length: int, as_json: bool) -> None:
    """Counts, formats, token-length percentiles and truncation at --max-seq-length."""
    from qwen_mlx.dataprep import stats

    result = stats(path, model_dir, max_seq_length)
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
    for problem in result["problems"][:20]:
        err_console.print(f"[yellow]bad record[/] {problem}", highlight=False)


@cli.command()
@_config_option
@click.option(
    "--backend",
    type=click.Choice(CHOICES),
    default=None,
    help="Trainer (default: training.backend from the config, normally auto).",
)
@_preset_option
@_set_option
@click.option(
    "--resume",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Continue an interrupted run from its last checkpoint (its folder).",
)
def train(
    config_path: Path | None,
    backend: str | None,
    preset: str | None,
    overrides: tuple[str, ...],
    resume: Path | None,
) -> None:
    """Train a LoRA adapter (QLoRA on a 4-bit base by default) on your data.

    The config is read in layers: built-in defaults, then config.yaml (or -c FILE), then
    --preset, then each --set. The run folder (output.dir) gets the resolved config.yaml,
    adapter/, checkpoints/ and metrics.jsonl. Run `qwen-mlx check` first.
    """
    from qwen_mlx.training_run import start

    start(_default_config(config_path), backend, preset, overrides, resume, console)


@cli.command("tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data",
    "data_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSONL whose text trains the tiny BPE tokenizer (default: built-in sample text).",
)
def tiny_model(out_dir: Path, data_file: Path | None) -> None:
    """Build the offline demo model: a tiny random-weight Qwen2 with a real tokenizer.

    Saved exactly like a downloaded Qwen2.5-Instruct folder, so every command can be tried
    (and tested) without downloading anything. Its answers are noise until trained.
    """
    from qwen_mlx.tiny import build_tiny_model

    path = build_tiny_model(out_dir, data_file=data_file)
    console.print(f"[green]✓[/] tiny Qwen2 model written to {path}", highlight=False)


_QUANTS = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # qwen_mlx.gguf_export.QUANT_CHOICES
_model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Base model folder (default: the one the run's config or the adapter names).",
)


@cli.command()
@click.argument("run_or_adapter", type=click.Path(path_type=Path))
@_model_option
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the fused model (replaced only once complete).",
)
def fuse(run_or_adapter: Path, model_dir: Path | None, out_dir: Path) -> None:
    """Merge a run's LoRA adapter into its base model: a plain Hugging Face folder.

    RUN_OR_ADAPTER is a run folder (outputs/<run>) or an adapter folder (PEFT or mlx-lm).
    The result loads in transformers, mlx-lm or llama.cpp's converter like any model;
    weights keep the base's dtype. Works tensor by tensor, in little memory.
    """
    from qwen_mlx.fuse import fuse as run_fuse

    result = run_fuse(run_or_adapter, out_dir, model_dir)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(
        f"[green]✓[/] {result.fused} adapted weights fused, {result.copied} copied → {out_dir}",
        highlight=False,
    )


@cli.command()
@click.argument("run_or_adapter", required=False, type=click.Path(path_type=Path))
@_model_option
@click.option(
    "-o",
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The GGUF file to write, e.g. outputs/run/model-q4_k_m.gguf.",
)
@click.option(
    "--quant",
    type=click.Choice(_QUANTS),
    default=None,
    help="Weight type: f16 (default), bf16, q8_0, q4_0, or q4_k_m (needs llama-cpp-python). "
    "With --lora-only: f16 or bf16 (default f32).",
)
@click.option(
    "--lora-only", is_flag=True, help="Write only the adapter, as a LoRA GGUF (llama.cpp --lora)."
)
@click.option(
    "--ollama",
    "ollama_name",
    metavar="NAME",
    default=None,
    help="Also run `ollama create NAME` with the Modelfile (needs ollama on PATH).",
)
def export(
    run_or_adapter: Path | None,
    model_dir: Path | None,
    out_file: Path,
    quant: str | None,
    lora_only: bool,
    ollama_name: str | None,
) -> None:
    """Export a trained run (or a plain --model) to GGUF for ollama and llama.cpp.

    The adapter is applied on the fly; no fused copy is written. A Modelfile with the
    Qwen2.5 chat template and stop tokens is written beside the GGUF.
    """
    from qwen_mlx.gguf_export import export as run_export

    result = run_export(
        run_or_adapter,
        out_file,
        model=model_dir,
        quant=quant,
        lora_only=lora_only,
        ollama=ollama_name,
    )
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    size = result.path.stat().st_size / 1e6
    console.print(
        f"[green]✓[/] wrote {result.path} ({size:,.1f} MB)", highlight=False, soft_wrap=True
    )
    if result.modelfile is None:
        console.print(
            f"use it with llama.cpp (--lora {result.path}) or in an ollama Modelfile "
            f"(FROM <base model GGUF> then ADAPTER {result.path})",
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print(f"[green]✓[/] wrote {result.modelfile}", highlight=False, soft_wrap=True)
    if ollama_name:
        console.print(f"[green]✓[/] ollama model {ollama_name} created", highlight=False)
    else:
        command = " ".join(result.ollama_create)
        console.print(f"load it into ollama with:\n  {command}", highlight=False, soft_wrap=True)


@cli.group(cls=_Group)
def adapter() -> None:
    """Work with LoRA adapters: convert between PEFT and mlx-lm formats."""


@adapter.command("convert")
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--to",
    "to_format",
    required=True,
    type=click.Choice(["mlx-lm", "peft"]),
    help="Target format: mlx-lm (adapters.safetensors) or peft (adapter_model.safetensors).",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the converted adapter.",
)
def adapter_convert(adapter_dir: Path, to_format: str, out_dir: Path) -> None:
    """Convert ADAPTER_DIR (a PEFT or mlx-lm LoRA adapter, or a run folder) to another format.

    The update each layer applies is unchanged: mlx_lm.load(model, adapter_path=OUT) and
    peft.PeftModel.from_pretrained(model, OUT) give the same model.
    """
    from qwen_mlx.adapters import convert_adapter

    convert_adapter(adapter_dir, to_format, out_dir)
    console.print(f"[green]✓[/] {to_format} adapter written to {out_dir}", highlight=False)


_run_argument = click.argument(
    "run_or_adapter", required=False, type=click.Path(exists=True, path_type=Path)
)
_model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A model folder to use without an adapter (or instead of the run's base).",
)
_gguf_option = click.option(
    "--gguf",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Run an exported GGUF file through llama.cpp instead.",
)
_engine_backend = click.option(
    "--backend",
    type=click.Choice(CHOICES),
    default="auto",
    show_default=True,
    help="Backend that loads the model (auto: MLX on Apple Silicon, else PyTorch).",
)


def _engine(run_or_adapter: Path | None, model_dir: Path | None, gguf: Path | None, backend: str):
    from qwen_mlx.inference import open_engine

    if run_or_adapter is None and model_dir is None and gguf is None:
        raise UserError("give a run or adapter folder, --model DIR or --gguf FILE")
    return open_engine(run_or_adapter, model_dir, gguf, backend)


@cli.command("eval")
@click.argument("run_or_adapter", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Test file (default: the run's test split, else data.test_file, else valid split).",
)
@click.option("--compare-base", is_flag=True, help="Also evaluate the base model, side by side.")
@_gguf_option
@_engine_backend
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N questions.")
def eval_command(run_or_adapter, data, compare_base, gguf, backend, max_tokens, limit) -> None:
    """Test loss, perplexity and greedy answers scored with ROUGE-L / BLEU-4 (characters).

    Writes RUN/eval/: report.html (loss curve, question / reference / base / tuned table),
    report.md, summary.json and answers.jsonl.
    """
    from qwen_mlx.evaluate import evaluate

    evaluate(run_or_adapter, data, compare_base=compare_base, gguf=gguf, backend=backend,
             max_tokens=max_tokens, limit=limit, console=console)  # fmt: skip


@cli.command()
@_run_argument
@_model_option
@_gguf_option
@_engine_backend
@click.option("--prompt", help="Answer this once and exit (for scripts).")
@click.option("--system", help="System prompt (default: the run's data.system_prompt).")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 2),
    default=None,
    help="0 = greedy (default with --prompt); 0.7 interactively.",
)
def chat(run_or_adapter, model_dir, gguf, backend, prompt, system, max_tokens, temperature):
    """Chat with a trained run (streaming). /reset, /system TEXT, /exit inside the chat."""
    import sys

    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.chat import interactive, reply

    engine = _engine(run_or_adapter, model_dir, gguf, backend)
    default_temperature = 0.0 if prompt is not None else 0.7
    settings = GenerationSettings(
        max_tokens=max_tokens,
        temperature=default_temperature if temperature is None else temperature,
        top_p=0.8,
    )
    system = system or _run_system_prompt(run_or_adapter)
    if prompt is None:
        interactive(engine, settings, system, console)
        return
    head = [{"role": "system", "content": system}] if system else []
    reply(engine, [*head, {"role": "user", "content": prompt}], settings, sys.stdout)


def _run_system_prompt(run_or_adapter: Path | None) -> str | None:
    if run_or_adapter is None:
        return None
    from qwen_mlx.adapters import resolve_source

    source = resolve_source(run_or_adapter, None)
    return source.system_prompt


@cli.command()
@_run_argument
@_model_option
@_gguf_option
@_engine_backend
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY'.")
def serve(run_or_adapter, model_dir, gguf, backend, host, port, api_key) -> None:
    """OpenAI-compatible API: /v1/chat/completions (incl. stream), /v1/models, /health."""
    from qwen_mlx.serve import run

    run(_engine(run_or_adapter, model_dir, gguf, backend), host, port, api_key, console)


def main() -> None:
    cli(prog_name="qwen-mlx")
