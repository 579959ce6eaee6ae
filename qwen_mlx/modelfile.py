"""The ollama Modelfile beside an exported GGUF (``NAME.Modelfile``), and ``ollama create``.

Ollama guesses a prompt template from the GGUF's chat template and often guesses wrong for
fine-tunes: answers then run on forever or leak ``<|im_start|>``. So the Modelfile states
the Qwen2.5 ChatML template and both stop tokens itself. When the model's own template adds
Qwen's default system prompt to conversations without one (as training did), so does ours.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_text
from qwen_mlx.tiny import DEFAULT_SYSTEM_PROMPT

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

# Go template (ollama): a system turn, then every message as <|im_start|>role … <|im_end|>, and
# an open assistant turn to answer in. The {{- else }} branch serves old /api/generate clients.
_TEMPLATE = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""


def default_system(chat_template: str | None) -> str | None:
    """Qwen's default system prompt if the model's chat template inserts it, else None."""
    return (
        DEFAULT_SYSTEM_PROMPT if chat_template and DEFAULT_SYSTEM_PROMPT in chat_template else None
    )


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'the {what} contains """, which a Modelfile cannot hold')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, system: str | None) -> str:
    """The Modelfile for ``./gguf_name`` (in the same folder), with ``system`` as SYSTEM."""
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {_quoted(_TEMPLATE, 'template')}", ""]
    if system:
        lines += [f"SYSTEM {_quoted(system, 'system prompt')}", ""]
    lines += [f'PARAMETER stop "{token}"' for token in STOP_TOKENS]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """``NAME.Modelfile`` beside ``NAME.gguf``: each export in a folder keeps its own."""
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def write_modelfile(gguf_path: Path, system: str | None) -> Path:
    """Write the Modelfile of ``gguf_path`` beside it (atomically) and return its path."""
    path = modelfile_path(gguf_path)
    write_text(path, modelfile_text(gguf_path.name, system))
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
