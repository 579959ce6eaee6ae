"""``qwen-mlx`` commands that use a trained model: fuse, export, adapter, eval, chat, serve.

:mod:`qwen_mlx.cli` adds ``COMMANDS`` to its group. Like every command they are thin
wrappers over library functions, imported lazily so the CLI starts without torch, mlx or gguf.
"""

from __future__ import annotations

from pathlib import Path

import click

from qwen_mlx.backends import CHOICES
from qwen_mlx.cli_base import (
    ErrorLineGroup,
    console,
    err_console,
    judge_options,
    server_options,
)
from qwen_mlx.errors import UserError
from qwen_mlx.export.gguf_quants import QUANT_CHOICES
from qwen_mlx.families import names as family_names
from qwen_mlx.serve import DEFAULT_MAX_CONCURRENT

_model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Base model folder (default: the one the run's config or the adapter names).",
)


def _out_dir_option(text: str):
    """``-o/--out OUT_DIR``: the folder a command writes."""
    folder = click.Path(file_okay=False, path_type=Path)
    return click.option("-o", "--out", "out_dir", required=True, type=folder, help=text)


_force_option = click.option(
    "--force",
    is_flag=True,
    help="Replace OUT_DIR even if it holds files this command did not write (never a run folder).",
)


@click.command()
@click.argument("run_or_adapter", type=click.Path(path_type=Path))
@_model_option
@_out_dir_option("Folder for the fused model (replaced only once complete).")
@_force_option
def fuse(run_or_adapter: Path, model_dir: Path | None, out_dir: Path, force: bool) -> None:
    """Merge a run's LoRA adapter into its base model: a plain Hugging Face folder.

    RUN_OR_ADAPTER is a run folder (outputs/<run>) or an adapter folder (PEFT or mlx-lm).
    The result loads in transformers, mlx-lm or llama.cpp's converter like any model;
    weights keep the base's dtype. Works tensor by tensor, in little memory.
    """
    from qwen_mlx.export.fuse import fuse as run_fuse

    result = run_fuse(run_or_adapter, out_dir, model_dir, force=force)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(
        f"[green]✓[/] {result.fused} adapted weights fused, {result.copied} copied → {out_dir}",
        highlight=False,
    )


@click.command()
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
    type=click.Choice(QUANT_CHOICES),
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
@click.option(
    "--print-serve-commands",
    is_flag=True,
    help="Write nothing; print the vLLM, llama.cpp server and ollama command lines that "
    "serve this run (and the GGUF -o names) to many users.",
)
def export(
    run_or_adapter: Path | None,
    model_dir: Path | None,
    out_file: Path,
    quant: str | None,
    lora_only: bool,
    ollama_name: str | None,
    print_serve_commands: bool,
) -> None:
    """Export a trained run (or a plain --model) to GGUF for ollama and llama.cpp.

    The adapter is applied on the fly; no fused copy is written. A Modelfile with the model
    family's chat template and stop tokens is written beside the GGUF.
    """
    from qwen_mlx.export.gguf import export as run_export

    if print_serve_commands:
        _print_serve_commands(run_or_adapter, out_file, model_dir, lora_only)
        return
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


def _print_serve_commands(
    run_or_adapter: Path | None, gguf: Path, model_dir: Path | None, lora_only: bool
) -> None:
    from qwen_mlx.export.serving import serve_commands

    found = serve_commands(run_or_adapter, gguf, model=model_dir, lora_only=lora_only)
    for note in found.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for what, command in found.commands:
        console.print(f"# {what}\n{command}", highlight=False, soft_wrap=True, markup=False)


@click.group(cls=ErrorLineGroup)
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
@_out_dir_option("Folder for the converted adapter.")
@_force_option
def adapter_convert(adapter_dir: Path, to_format: str, out_dir: Path, force: bool) -> None:
    """Convert ADAPTER_DIR (a PEFT or mlx-lm LoRA adapter, or a run folder) to another format.

    The update each layer applies is unchanged: mlx_lm.load(model, adapter_path=OUT) and
    peft.PeftModel.from_pretrained(model, OUT) give the same model.
    """
    from qwen_mlx.adapter_convert import convert_adapter

    convert_adapter(adapter_dir, to_format, out_dir, force)
    console.print(f"[green]✓[/] {to_format} adapter written to {out_dir}", highlight=False)


_run_argument = click.argument(
    "run_or_adapter", required=False, type=click.Path(exists=True, path_type=Path)
)
_plain_model_option = click.option(
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


@click.command("eval")
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
@judge_options
@click.option(
    "--general",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Prompts for the general drift (default: the held-out part of the general prompt set "
    "shipped with qwen-mlx).",
)
@click.option(
    "--general-prompts",
    type=click.IntRange(0),
    default=40,
    show_default=True,
    help="How many general prompts measure the drift from the base (0: skip it).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Questions answered together (default: 8, fewer where the memory estimate says "
    "they would not fit; 1: one by one).",
)
@click.option(
    "--pairs",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Held-out preference pairs (chosen/rejected): report the tuned model's preference "
    "accuracy and reward margin over its base (default: the test file's own pairs, if any).",
)
def eval_command(
    run_or_adapter,
    data,
    compare_base,
    gguf,
    backend,
    max_tokens,
    limit,
    general,
    general_prompts,
    batch_size,
    pairs,
    **judge,
) -> None:
    """Test loss, perplexity and greedy answers scored with ROUGE-L / BLEU-4 (characters).

    Writes RUN/eval/ (RUN/eval-gguf/ with --gguf): report.html (loss curve, side-by-side table),
    report.md, summary.json and answers.jsonl. With --judge-url/--judge-model, a teacher model
    grades every answer correct / partly / wrong against the reference (and, for a test file
    from `data distill`, its source passage); the accuracy joins the report.

    Answers that hold: the report also gives the in-domain scores on answerable questions (and
    on those worded unlike any training question), the refusal rate on questions the rules do
    not answer (kind: unanswerable), and the tuned model's general drift from its base
    (per-token KL on general prompts the base answered; not for --gguf).

    Preference accuracy: with --pairs (or a test file of pairs), the share of held-out pairs
    whose chosen answer the tuned model prefers more than its base does (DPO's implicit
    reward), and the mean reward margin.
    """
    from qwen_mlx.eval.evaluate import evaluate
    from qwen_mlx.eval.judge import judge_settings

    evaluate(
        run_or_adapter,
        data,
        compare_base=compare_base,
        gguf=gguf,
        backend=backend,
        max_tokens=max_tokens,
        limit=limit,
        judge=judge_settings(judge["judge_url"], judge["judge_model"], judge["judge_key_env"]),
        general=general,
        general_prompts=general_prompts,
        batch_size=batch_size,
        pairs=pairs,
        console=console,
    )


@click.command()
@_run_argument
@_plain_model_option
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


@click.command()
@_run_argument
@_plain_model_option
@_gguf_option
@_engine_backend
@server_options(port=8000)
@click.option(
    "--base-gguf",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="With --gguf: the base model's GGUF, which the page compares the tuned one with.",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(1, 256),
    default=DEFAULT_MAX_CONCURRENT,
    show_default=True,
    help="Requests decoded together (continuous batching; more wait in a queue). 1: one "
    "at a time. A GGUF's batch holds this many full contexts of KV cache while it runs "
    "(and 5 minutes idle, keeping the prompts it read for a next turn).",
)
def serve(
    run_or_adapter,
    model_dir,
    gguf,
    backend,
    host,
    port,
    allowed_hosts,
    api_key,
    api_key_env,
    cors_origins,
    base_gguf,
    max_concurrent,
) -> None:
    """OpenAI-compatible API: /v1/chat/completions (incl. stream), /v1/models, /health.

    A chat page at / (streamed replies, Markdown, settings). Served on a run, the page can
    ask the base model too and show both answers side by side (the adapter switched off, or
    --base-gguf beside --gguf), and links the run's eval report and loss curve.

    A request holds at most 2048 messages; headers must arrive within 10 s, a body in 60 s.
    """
    from qwen_mlx.serve.page import open_base
    from qwen_mlx.serve.server import api_key_of, run

    if base_gguf is not None and gguf is None:
        raise UserError("--base-gguf is the base to compare --gguf with: give --gguf TUNED.gguf")
    api_key = api_key_of(api_key, api_key_env)  # before the model loads: a mistake shows now
    engine = _engine(run_or_adapter, model_dir, gguf, backend)
    page = {
        "base": open_base(engine, run_or_adapter, model_dir, base_gguf),
        "run_dir": run_or_adapter if run_or_adapter and run_or_adapter.is_dir() else None,
        "system_prompt": _run_system_prompt(run_or_adapter),
        "allowed_hosts": allowed_hosts,
        "max_concurrent": max_concurrent,
    }
    run(engine, host, port, api_key, console, cors_origins, **page)


@click.command("tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data",
    "data_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSONL whose text trains the tiny BPE tokenizer (default: built-in sample text).",
)
@click.option(
    "--arch",
    type=click.Choice(family_names()),
    default="qwen2",
    show_default=True,
    help="Model family the tiny model belongs to (its shapes, tokens and chat template).",
)
@_force_option
def tiny_model(out_dir: Path, data_file: Path | None, arch: str, force: bool) -> None:
    """Build the offline demo model: a tiny random-weight model of one family with a real tokenizer.

    Saved exactly like a downloaded Instruct model folder of that family (default: Qwen2.5),
    so every command can be tried (and tested) without downloading anything. Its answers are
    noise until trained.
    """
    from qwen_mlx.tiny import build_tiny_model

    path = build_tiny_model(out_dir, data_file=data_file, force=force, arch=arch)
    name = arch.replace("qwen", "Qwen")
    console.print(f"[green]✓[/] tiny {name} model written to {path}", highlight=False)


COMMANDS = (fuse, export, adapter, eval_command, chat, serve, tiny_model)
