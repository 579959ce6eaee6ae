"""The ollama Modelfile beside an exported GGUF (``NAME.Modelfile``), and ``ollama create``.

The Modelfile states the family's chat template in ollama's Go template language (the
family's ``ollama_template``: system turn, tools, tool calls and results, reasoning) and its
stop tokens, and opens replies the way the model was trained: on Qwen3, after an empty think
block unless the run was tuned with ``chat.enable_thinking``. When the model's own template
adds the family's default system prompt to conversations without one (as training did), so
does ours. ollama reads no sampling defaults from a GGUF, so the model's
``generation_config.json`` ones become ``PARAMETER`` lines.
"""

from __future__ import annotations

import json
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


# generation_config.json's sampling keys, their type, and ollama's PARAMETER for each.
SAMPLING_KEYS: dict[str, tuple[type, str]] = {
    "temperature": (float, "temperature"),
    "top_p": (float, "top_p"),
    "top_k": (int, "top_k"),
    "repetition_penalty": (float, "repeat_penalty"),
}


def sampling_defaults(model_dir: Path, as_ollama: bool = False) -> dict[str, float | int]:
    """The sampling defaults of the model's ``generation_config.json`` (those of
    ``SAMPLING_KEYS`` it gives, by its own key names); none without the file. ``as_ollama``:
    what ollama must be told to sample the same way (greedy is its temperature 0); without
    it, the values as written (for the GGUF's metadata)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path}: not readable JSON ({error}); fix or remove the file") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object; fix or remove the file")
    found: dict[str, float | int] = {}
    for key, (kind, _) in SAMPLING_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{path}: {key} must be a number, not {value!r}")
        found[key] = kind(value)
    if as_ollama and config.get("do_sample") is False:
        # transformers decodes greedily when do_sample is false, whatever temperature, top_p
        # and top_k say (the repetition penalty still applies); ollama's greedy is temperature 0.
        found = {
            "temperature": 0.0,
            **{k: v for k, v in found.items() if k == "repetition_penalty"},
        }
    return found


def parameter_lines(sampling: dict[str, float | int]) -> list[str]:
    """``PARAMETER`` lines for the sampling defaults (ollama's names)."""
    return [f"PARAMETER {SAMPLING_KEYS[key][1]} {value}" for key, value in sampling.items()]


def modelfile_text(
    gguf_name: str,
    system: str | None,
    family: Family,
    thinking: bool,
    sampling: dict[str, float | int] | None = None,
) -> str:
    """The Modelfile for ``./gguf_name`` (in the same folder), with ``system`` as SYSTEM and
    ``sampling`` (generation_config.json's defaults) as PARAMETER lines."""
    template = _quoted(family.ollama_template(thinking), "template")
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {template}", ""]
    if system:
        lines += [f"SYSTEM {_quoted(system, 'system prompt')}", ""]
    lines += [f'PARAMETER stop "{token}"' for token in family.stop_tokens]
    lines += parameter_lines(sampling or {})
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """``NAME.Modelfile`` beside ``NAME.gguf``: each export in a folder keeps its own."""
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def write_modelfile(
    gguf_path: Path,
    system: str | None,
    family: Family,
    thinking: bool = False,
    sampling: dict[str, float | int] | None = None,
) -> Path:
    """Write the Modelfile of ``gguf_path`` beside it (atomically) and return its path;
    ``thinking``: the model was tuned with chat.enable_thinking."""
    path = modelfile_path(gguf_path)
    write_text(path, modelfile_text(gguf_path.name, system, family, thinking, sampling))
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
