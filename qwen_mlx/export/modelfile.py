"""The ollama Modelfile beside an exported GGUF (``NAME.Modelfile``), and ``ollama create``.

Ollama guesses a prompt template from the GGUF's chat template and often guesses wrong for
fine-tunes: answers then run on forever or leak ``<|im_start|>``. So the Modelfile states
the family's template (ChatML for Qwen2.5) and its stop tokens itself, and opens replies the
way the model was trained: on Qwen3, after an empty think block unless the run was tuned with
``chat.enable_thinking``. When the model's own template adds the family's default system
prompt to conversations without one (as training did), so does ours.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.families import Family
from qwen_mlx.fsutil import write_text


def default_system(chat_template: str | None, family: Family) -> str | None:
    """The family's default system prompt if the model's chat template inserts it, else None."""
    prompt = family.default_system_prompt
    return prompt if chat_template and prompt in chat_template else None


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'the {what} contains """, which a Modelfile cannot hold')
    return f'"""{text}"""'


def ollama_template(family: Family, thinking: bool) -> str:
    """The family's ollama template; for a model tuned to reason, its thinking one."""
    return family.ollama_thinking_template if thinking and family.thinks else family.ollama_template


def modelfile_text(gguf_name: str, system: str | None, family: Family, thinking: bool) -> str:
    """The Modelfile for ``./gguf_name`` (in the same folder), with ``system`` as SYSTEM."""
    template = _quoted(ollama_template(family, thinking), "template")
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {template}", ""]
    if system:
        lines += [f"SYSTEM {_quoted(system, 'system prompt')}", ""]
    lines += [f'PARAMETER stop "{token}"' for token in family.stop_tokens]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """``NAME.Modelfile`` beside ``NAME.gguf``: each export in a folder keeps its own."""
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def write_modelfile(
    gguf_path: Path, system: str | None, family: Family, thinking: bool = False
) -> Path:
    """Write the Modelfile of ``gguf_path`` beside it (atomically) and return its path;
    ``thinking``: the model was tuned with chat.enable_thinking."""
    path = modelfile_path(gguf_path)
    write_text(path, modelfile_text(gguf_path.name, system, family, thinking))
    return path


def ollama_command(name: str, modelfile: Path) -> list[str]:
    return ["ollama", "create", name, "-f", str(modelfile)]


def require_ollama() -> str:
    """The ollama executable, or a one-line error saying how to get it."""
    found = shutil.which("ollama")
    if found is None:
        raise UserError("--ollama needs the ollama command on PATH: install it from ollama.com")
    return found


def ollama_create(name: str, modelfile: Path) -> None:
    """Run ``ollama create NAME -f Modelfile`` (from the Modelfile's folder, for ``FROM ./…``)."""
    command = ollama_command(name, modelfile.resolve())
    command[0] = require_ollama()
    result = subprocess.run(command, cwd=modelfile.parent, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"ollama create failed: {detail[-1] if detail else result.returncode}")
