"""``qwen-mlx export``: our own Hugging Face → GGUF writer (for llama.cpp and ollama).

Built on the ``gguf`` package, with the format facts checked against llama.cpp's converter.
Tensors are streamed: the header (metadata and the tensor table, whose sizes are known in
advance) is written first, then each tensor is read, converted and written in blocks of rows,
so memory stays at about one block whatever the model size. Exporting a run or adapter adds
the LoRA update to each weight on the way (no fused copy on disk); ``--lora-only`` writes the
adapter alone as a LoRA GGUF. Q4_K_M is streamed too: each block is quantized by ggml's own
quantizer (llama-cpp-python's library) with llama.cpp's per-tensor type choices, so the
tensors equal llama-quantize's and no 16-bit intermediate file is written.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from qwen_mlx.adapters import Source, resolve_source
from qwen_mlx.errors import UserError
from qwen_mlx.export import gguf_tensors as gt
from qwen_mlx.export.fuse import check_adapter_fits
from qwen_mlx.export.gguf_quants import LORA_QUANTS, QUANT_CHOICES
from qwen_mlx.export.gguf_tokenizer import GGUFVocab, add_vocab, default_chat_template, read_vocab
from qwen_mlx.export.llama_quant import require_llama_cpp
from qwen_mlx.export.modelfile import (
    default_system,
    modelfile_path,
    ollama_command,
    ollama_create,
    require_ollama,
    sampling_defaults,
    write_modelfile,
)
from qwen_mlx.families import Family, family_of
from qwen_mlx.file_progress import byte_progress
from qwen_mlx.fsutil import atomic_path
from qwen_mlx.model_files import read_model_config
from qwen_mlx.outputs import claim_files, writing
from qwen_mlx.run_dir import ADAPTER
from qwen_mlx.tensor_io import model_tensors

EXPORT = "export"

_WORKERS = min(4, os.cpu_count() or 1)  # threads encoding tensor blocks
# K-quants (q4_k_m) cost 30–75 ns a value in ggml's quantizer, not memory bandwidth: every
# core, as llama-quantize uses.
_QUANT_WORKERS = os.cpu_count() or 1


@dataclass
class ExportResult:
    path: Path
    modelfile: Path | None = None
    ollama_create: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("export needs the gguf package: pip install 'qwen-mlx[gguf]'") from None
    return gguf


# ---------------------------------------------------------------- metadata


def check_architecture(model_dir: Path) -> tuple[dict, Family]:
    """config.json of a supported causal LM and its family; anything else is one error line."""
    config = read_model_config(model_dir)
    family = family_of(config, model_dir)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise UserError(f"{model_dir}/config.json lacks {key}")
    return config, family


def _name_map(gguf, config: dict, family: Family):
    """gguf's Hugging Face → GGUF tensor names for this architecture and layer count."""
    arch = gguf.MODEL_ARCH[family.gguf_arch]
    return gguf.get_tensor_name_map(arch, config["num_hidden_layers"])


def _writer(gguf, path: Path, family: Family):
    return gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.gguf_arch]])


def rope_parameters(config: dict) -> dict:
    """Rope settings from transformers-5 ``rope_parameters`` or 4.x ``rope_scaling`` +
    top-level ``rope_theta``; Qwen2Config's default theta when neither says."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _linear_scaling(writer, gguf, params: dict) -> None:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(params["factor"]))


def _yarn_scaling(writer, gguf, params: dict) -> None:
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    optional = {
        "extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor,
        "attention_factor": writer.add_rope_scaling_yarn_attn_factor,
        "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
        "beta_slow": writer.add_rope_scaling_yarn_beta_slow,
    }
    for key, add in optional.items():
        if params.get(key) is not None:
            add(float(params[key]))


def _longrope_scaling(writer, gguf, params: dict) -> None:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


_ROPE_SCALING = {
    "linear": _linear_scaling,
    "yarn": _yarn_scaling,
    "longrope": _longrope_scaling,
    "su": _longrope_scaling,
}


def _add_sampling(writer, model_dir: Path) -> None:
    """generation_config's sampling defaults, which llama.cpp tools start from."""
    adders = {
        "top_k": writer.add_sampling_top_k,
        "top_p": writer.add_sampling_top_p,
        "temperature": writer.add_sampling_temp,
        "repetition_penalty": writer.add_sampling_penalty_repeat,
    }
    for key, value in sampling_defaults(model_dir).items():
        adders[key](value)


def add_model_metadata(writer, gguf, config: dict, model_dir: Path, name: str, file_type) -> None:
    """The ``general.*`` and architecture keys (``qwen2.*``) llama.cpp needs to build the model."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 32768))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    # Missing, llama.cpp would assume no GQA; Qwen2.5 always has fewer KV heads.
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope = rope_parameters(config)
    # Missing, llama.cpp silently uses 10000 instead of Qwen2.5's 1e6: garbage output.
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    scaling = _ROPE_SCALING.get(rope["rope_type"])
    if scaling is not None:
        scaling(writer, gguf, rope)
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    _add_sampling(writer, model_dir)


# ---------------------------------------------------------------- writing


def _write(writer, jobs: list[gt.TensorJob], description: str) -> list[str]:
    """Write header, metadata and tensor table, then stream every tensor's data."""
    for job in jobs:
        writer.add_tensor_info(job.name, job.shape, np.float32, job.nbytes, raw_dtype=job.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())  # tensor data starts aligned
    overflows = 0
    total = sum(job.source_bytes for job in jobs)
    workers = _QUANT_WORKERS if any(job.via is not None for job in jobs) else _WORKERS
    with byte_progress(description, total) as advance, ThreadPoolExecutor(workers) as pool:
        written = 0
        for block in gt.encoded_stream(jobs, pool, ahead=max(gt.IN_FLIGHT, 2 * workers)):
            fout.write(memoryview(np.ascontiguousarray(block.data)).cast("B"))
            written += block.data.nbytes
            overflows += block.overflows
            if block.last:
                job = block.job
                assert written == job.nbytes, f"{job.name}: {written} bytes, not {job.nbytes}"
                writer.write_padding(fout, job.nbytes)
                advance(job.source_bytes)
                written = 0
    writer.close()
    if overflows:
        return [
            f"{overflows} weights exceed float16's range (±65504) and became inf: use --quant bf16"
        ]
    return []


def write_model_gguf(
    path: Path, source: Source, quant: str, name: str, description: str = "writing GGUF"
) -> list[str]:
    """Write the model of ``source`` (its adapter fused, if any) as a GGUF; return any notes."""
    gguf = _gguf()
    model_dir, adapter = source.model_dir, source.adapter
    config, family = check_architecture(model_dir)
    tensors = model_tensors(model_dir)
    if adapter is not None:
        check_adapter_fits(adapter, tensors)
    vocab: GGUFVocab = read_vocab(model_dir, config, family, source.thinking)
    name_map = _name_map(gguf, config, family)
    transform = partial(family.gguf_transform, config=config)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.gguf_arch]]
    layers = config["num_hidden_layers"]
    jobs, notes = gt.model_jobs(gguf, tensors, name_map, adapter, quant, transform, arch, layers)
    writer = _writer(gguf, path, family)
    add_model_metadata(writer, gguf, config, model_dir, name, gt.QUANTS[quant].file_type)
    add_vocab(writer, vocab)
    notes += _write(writer, jobs, description)
    return vocab.notes + notes


def write_lora_gguf(path: Path, source: Source, quant: str, name: str) -> list[str]:
    """Write ``source.adapter`` as a LoRA GGUF (llama.cpp ``--lora``, ollama ``ADAPTER``)."""
    gguf = _gguf()
    config, family = check_architecture(source.model_dir)
    check_adapter_fits(source.adapter, model_tensors(source.model_dir))
    name_map = _name_map(gguf, config, family)
    transform = partial(family.gguf_transform, config=config)
    jobs, alpha = gt.lora_jobs(gguf, source.adapter, name_map, quant, transform)
    writer = _writer(gguf, path, family)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_base_model(writer, source)
    return _write(writer, jobs, "writing LoRA GGUF")


def _add_base_model(writer, source: Source) -> None:
    """``general.base_model.*`` as llama.cpp's LoRA converter writes them: the model the
    adapter belongs to (name, organization and repo_url from a Hugging Face id, gguf's rules)."""
    from gguf.metadata import Metadata

    writer.add_base_model_count(1)
    repo_id = source.base_repo_id()
    if repo_id is None:
        writer.add_base_model_name(0, source.model_dir.resolve().name)
        return
    card = {"base_model": repo_id}
    (entry,) = Metadata.apply_metadata_heuristic(Metadata(), model_card=card).base_models
    for key, value in entry.items():
        getattr(writer, f"add_base_model_{key}")(0, value)


# ---------------------------------------------------------------- the command


def _check_request(source: Source, quant: str | None, lora_only: bool) -> str:
    """The effective quant type, after checking the combination makes sense."""
    if lora_only:
        if source.adapter is None:
            raise UserError("--lora-only needs a run or adapter folder, not just --model")
        quant = quant or "f32"
        if quant not in LORA_QUANTS:
            raise UserError("--lora-only takes --quant f16 or bf16 (default: f32, it is small)")
        return quant
    quant = quant or "f16"
    if quant not in gt.QUANTS:
        raise UserError(f"unknown --quant {quant}: choose one of {', '.join(QUANT_CHOICES)}")
    if gt.QUANTS[quant].needs_llama_cpp:
        require_llama_cpp()
    return quant


def export(
    run_or_adapter: Path | None,
    out: Path,
    *,
    model: Path | None = None,
    quant: str | None = None,
    lora_only: bool = False,
    ollama: str | None = None,
) -> ExportResult:
    """Export a model, a run or an adapter to the GGUF file ``out`` (+ a Modelfile)."""
    source = resolve_source(run_or_adapter, model)
    check_architecture(source.model_dir)  # an unsupported model: refused before any folder is made
    quant = _check_request(source, quant, lora_only)
    if ollama and lora_only:
        raise UserError("--ollama needs a full model export, not --lora-only")
    if ollama:
        require_ollama()
    out = Path(out)
    names = _claim_outputs(out, source, lora_only)
    name = model_name(Path(run_or_adapter) if run_or_adapter else source.model_dir)
    with writing(out.parent, EXPORT, names):
        if lora_only:
            with atomic_path(out) as tmp:
                notes = write_lora_gguf(tmp, source, quant, name)
            return ExportResult(out, notes=notes)
        with atomic_path(out) as tmp:
            notes = write_model_gguf(tmp, source, quant, name)
        return _finish(out, source, name, ollama, notes)


def _claim_outputs(out: Path, source: Source, lora_only: bool) -> list[str]:
    """The files export writes (NAME.gguf and, for a model, NAME.Modelfile), after checking
    that none replaces an input, a run's part, a file we did not write or a hand edit."""
    if out.suffix.lower() != ".gguf" or out.is_dir():
        raise UserError(f"{out}: give -o a file path ending in .gguf (e.g. -o model.gguf)")
    names = [out.name] if lora_only else [out.name, modelfile_path(out).name]
    inputs = [source.model_dir] + ([source.adapter.path] if source.adapter else [])
    claim_files(out.parent, EXPORT, names, inputs)
    return names


def model_name(path: Path) -> str:
    """A name for general.name and ollama: the run's folder (not "adapter"), lower-case."""
    path = path.resolve()
    if path.name == ADAPTER:
        path = path.parent
    return re.sub(r"[^a-z0-9._-]+", "-", path.name.lower()).strip("-.") or "model"


def _finish(out: Path, source: Source, name: str, ollama: str | None, notes: list[str]):
    _, family = check_architecture(source.model_dir)
    template = default_chat_template(source.model_dir)
    system = source.system_prompt or default_system(template, family)
    sampling = sampling_defaults(source.model_dir, as_ollama=True)
    modelfile = write_modelfile(out, system, family, source.thinking, sampling)
    notes += [source.qlora_note] if source.qlora_note else []
    command = ollama_command(ollama or name, modelfile)
    if ollama:
        ollama_create(ollama, modelfile)
    return ExportResult(out, modelfile, command, notes)
