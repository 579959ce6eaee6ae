"""Serving a run to many users with an engine that batches requests: the command lines for
vLLM (the base model plus the run's LoRA adapter), llama.cpp's server (the exported GGUF in
several slots) and ollama, filled in for one run (``qwen-mlx export --print-serve-commands``).

Also the checks vLLM applies to a LoRA adapter as it loads one, as facts read from its
source (``vllm/config/lora.py``, ``vllm/lora/peft_helper.py``, ``vllm/lora/lora_model.py``,
``vllm/lora/utils.py``): a run's adapter is checked before the vLLM line is printed, so a
command that vLLM would refuse is never suggested.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from qwen_mlx.adapters import PEFT_CONFIG, PEFT_WEIGHTS, Adapter, Source, resolve_source
from qwen_mlx.errors import UserError
from qwen_mlx.export.modelfile import modelfile_path, ollama_command
from qwen_mlx.families import Family, family_of
from qwen_mlx.model_files import read_model_config
from qwen_mlx.tensor_io import index_file

# --max-lora-rank takes only these (vllm/config/lora.py MaxLoRARanks); 16 unless given.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# vLLM fuses q/k/v and gate/up into one layer each; an adapter may name either form.
VLLM_PACKED_MODULES = ("qkv_proj", "gate_up_proj")
# adapter_config.json keys PEFTHelper requires.
VLLM_REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")
# Tensor name endings vLLM parses (parse_fine_tuned_lora_name): the module comes before them.
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")

# llama.cpp's server: requests share the context, one slot each; each slot gets
# ctx-size / parallel tokens.
LLAMA_SLOTS = 4
LLAMA_SLOT_CONTEXT = 4096


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UserError(
        f"LoRA rank {rank} is above the largest --max-lora-rank vLLM takes "
        f"({VLLM_MAX_LORA_RANKS[-1]}): serve the exported GGUF with llama.cpp or ollama"
    )


def vllm_lora_modules(family: Family, config: dict) -> set[str]:
    """The module names vLLM gives LoRA on a model of ``family``: its linear layers, also as
    vLLM's fused layers."""
    return set(family.linear_shapes(config)) | set(VLLM_PACKED_MODULES)


def _module_of(tensor: str) -> str | None:
    """The module a LoRA tensor belongs to, as vLLM parses the name; None when vLLM cannot."""
    for suffix in _LORA_SUFFIXES:
        if tensor.endswith(suffix):
            return tensor.removesuffix(suffix).removeprefix("base_model.model.")
    return None


def vllm_problems(adapter_dir: Path, expected_modules: set[str]) -> list[str]:
    """What vLLM refuses (or silently gets wrong) in the adapter folder, one line each."""
    adapter_dir = Path(adapter_dir)
    config_path, weights = adapter_dir / PEFT_CONFIG, adapter_dir / PEFT_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        return [
            f"{adapter_dir} is not a PEFT adapter ({PEFT_CONFIG} and {PEFT_WEIGHTS}), which vLLM "
            f"needs: qwen-mlx adapter convert {adapter_dir} --to peft -o OUT"
        ]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return [f"{config_path} is not readable JSON ({error})"]
    problems = [
        f"{config_path} lacks {key}, which vLLM requires"
        for key in VLLM_REQUIRED_KEYS
        if key not in config
    ]
    if config.get("modules_to_save"):
        problems.append(f"{config_path}: vLLM refuses modules_to_save (fully trained layers)")
    if config.get("use_dora"):
        problems.append(f"{config_path}: vLLM refuses DoRA (use_dora)")
    if config.get("bias", "none") != "none":
        problems.append(f"{config_path}: vLLM refuses a LoRA bias (bias {config['bias']!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(
                f"{config_path}: vLLM ignores {key}, so the layers it names would be scaled "
                "with the adapter's r and lora_alpha"
            )
    rank = config.get("r")
    if isinstance(rank, int) and rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"{config_path}: rank {rank} is above vLLM's largest --max-lora-rank")
    unexpected = set()
    for tensor in index_file(weights):
        module = _module_of(tensor)
        if module is None or module.rsplit(".", 1)[-1] not in expected_modules:
            unexpected.add(module or tensor)
    if unexpected:
        problems.append(
            f"{weights}: vLLM gives LoRA only to {', '.join(sorted(expected_modules))}, "
            f"not to {', '.join(sorted(unexpected)[:3])}"
        )
    return problems


@dataclass
class ServeCommands:
    """The command lines for one run: (what, command) pairs, and why some are missing."""

    commands: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _join(args: list[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def _base_name(source: Source) -> str:
    """The base model as vLLM takes it: its Hugging Face id where known, else its folder."""
    return source.base_repo_id() or str(source.model_dir)


def _vllm(source: Source, family: Family, config: dict, name: str, result: ServeCommands):
    args = ["vllm", "serve", _base_name(source)]
    adapter: Adapter | None = source.adapter
    if adapter is not None:
        problems = vllm_problems(adapter.path, vllm_lora_modules(family, config))
        if problems:
            result.notes += [f"no vLLM line: {p}" for p in problems]
            return
        rank = max(pair.rank for pair in adapter.pairs.values())
        args += ["--enable-lora", "--lora-modules", f"{name}={adapter.path}"]
        args += ["--max-lora-rank", str(vllm_max_lora_rank(rank))]
    if family.thinks and not source.thinking:
        # Qwen3's template thinks unless told; the run was tuned to answer directly.
        args += ["--default-chat-template-kwargs", json.dumps({"enable_thinking": False})]
    what = f"vLLM (continuous batching; the adapter is the model {name})" if adapter else "vLLM"
    result.commands.append((what, _join(args)))


def serve_commands(
    run_or_adapter: Path | None, gguf: Path, *, model: Path | None = None, lora_only: bool = False
) -> ServeCommands:
    """The serving command lines for the run (or adapter, or --model) and the GGUF ``gguf``
    that ``export`` writes (or wrote) for it."""
    from qwen_mlx.export.gguf import model_name

    source = resolve_source(run_or_adapter, model)
    config = read_model_config(source.model_dir)
    family = family_of(config, source.model_dir)
    name = model_name(Path(run_or_adapter) if run_or_adapter else source.model_dir)
    result = ServeCommands()
    _vllm(source, family, config, name, result)
    slots = ["--parallel", str(LLAMA_SLOTS), "--ctx-size", str(LLAMA_SLOTS * LLAMA_SLOT_CONTEXT)]
    if lora_only:
        llama = ["llama-server", "-m", "BASE.gguf", "--lora", str(gguf), *slots, "--jinja"]
        what = "llama.cpp server (BASE.gguf: the base model's GGUF)"
        result.commands.append((what, _join(llama)))
        return result
    llama = ["llama-server", "-m", str(gguf), *slots, "--jinja"]
    result.commands.append((f"llama.cpp server ({LLAMA_SLOTS} requests at a time)", _join(llama)))
    server = _join([f"OLLAMA_NUM_PARALLEL={LLAMA_SLOTS}", "ollama", "serve"])
    result.commands.append((f"ollama server ({LLAMA_SLOTS} requests at a time per model)", server))
    create = _join(ollama_command(name, modelfile_path(gguf)))
    result.commands.append(("ollama model (with that server running)", create))
    return result
