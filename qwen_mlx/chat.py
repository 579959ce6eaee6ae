"""``qwen-mlx chat``: talk to a trained model in the terminal, or answer once for scripts.

Replies stream token by token. The conversation is kept as history; ``/reset`` clears it,
``/system TEXT`` sets the system prompt (and clears the history), ``/exit`` (or Ctrl-D)
leaves. ``--prompt TEXT`` answers one question and exits, printing only the answer. A think
block a reply opens with (Qwen3 with ``chat.enable_thinking``) is shown dimmed in the terminal
and never kept as the answer: the template drops earlier turns' reasoning anyway.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.chat_template import PromptTooLong
from qwen_mlx.inference import Engine, ask
from qwen_mlx.reasoning import ReasoningSplit

HELP = "commands: /reset (new conversation), /system TEXT (set system prompt), /exit"


class Conversation:
    """The system prompt and the turns so far."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self, question: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": question}]

    def add(self, question: str, answer: str) -> None:
        self.turns += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]


def reply(
    engine: Engine,
    messages: list[dict],
    settings: GenerationSettings,
    out,
    thoughts: Callable[[str], None] | None = None,
) -> str:
    """Stream the answer to ``out`` (a file-like object) and return it; the think block the
    reply may open with goes to ``thoughts`` as it arrives (or nowhere)."""
    split, parts = ReasoningSplit(engine.family.think_tags), []
    for chunk in ask(engine, messages, settings):
        for field, text in split.feed(chunk.text):
            if field == "content":
                out.write(text)
                out.flush()
                parts.append(text)
            elif thoughts is not None:
                thoughts(text)
    for _field, text in split.finish():  # only what may have been a tag's start
        out.write(text)
        parts.append(text)
    out.write("\n")
    return "".join(parts)


def handle_command(line: str, conversation: Conversation, console: Console) -> bool:
    """Apply a /command; return False when the user wants to leave."""
    command, _, argument = line.partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        conversation.turns.clear()
        console.print("[dim]conversation cleared[/]")
    elif command == "/system":
        conversation.system = argument.strip() or None
        conversation.turns.clear()
        console.print(f"[dim]system prompt {'set' if conversation.system else 'removed'}[/]")
    else:
        console.print(f"[yellow]unknown command {command}[/] — {HELP}")
    return True


def interactive(engine: Engine, settings: GenerationSettings, system: str | None, console) -> None:
    console.print(f"chatting with {engine.description}; {HELP}", highlight=False)
    conversation = Conversation(system)
    while True:
        try:
            line = console.input("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(line, conversation, console):
                return
            continue
        console.print("[bold blue]model>[/] ", end="")
        try:
            answer = reply(
                engine, conversation.messages(line), settings, console.file, _dimmed(console)
            )
        except KeyboardInterrupt:  # stop this answer, keep the session
            console.print("\n[dim](stopped)[/]")
            continue
        except PromptTooLong as err:
            console.print(f"\n[yellow]{err}[/] (/reset starts a new conversation)")
            continue
        conversation.add(line, answer)


def _dimmed(console: Console) -> Callable[[str], None]:
    def show(text: str) -> None:
        console.print(text, style="dim", end="", markup=False, highlight=False)

    return show
