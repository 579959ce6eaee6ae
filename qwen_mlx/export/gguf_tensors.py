"""Which GGUF tensors a model (or LoRA adapter) becomes, their types, and their bytes.

Type rules follow llama.cpp's converter: norms, biases and other 1-D tensors stay F32; the
matrices take the requested type; a matrix whose row length is not a multiple of the type's
block size falls back to F16. For q4_0 the output matrix (the tied embedding on Qwen2.5
0.5B–3B) is kept at 8 bits, as llama.cpp's quantizer keeps it at 6, because 4-bit logits
hurt most. q4_k_m takes llama.cpp's quantizer's per-tensor mixture (llama_quant), quantized
by ggml block by block. Names map through gguf's own Hugging Face → GGUF table; no transposes.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from functools import partial

import numpy as np

from qwen_mlx.adapters import Adapter, LoraPair
from qwen_mlx.errors import UserError
from qwen_mlx.export.gguf_quants import QUANTS, QuantSpec
from qwen_mlx.tensor_io import TensorRef, bf16_to_f16, encode_rows, f32_to_bf16, f32_to_f16

# Tensors llama.cpp does not expect (it checks the count); transformers may save them.
_SKIP = re.compile(r".*\.(rotary_emb\.inv_freq|attention\.masked_bias|attention\.bias)")
_LAYER = re.compile(r"blk\.(\d+)\.")
IN_FLIGHT = 8  # blocks read and encoded ahead of the writer


@dataclass
class TensorJob:
    """One GGUF tensor: where its values come from and how they are encoded."""

    name: str
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed)
    ref: TensorRef | None = None  # a model tensor…
    pair: LoraPair | None = None  # …plus this LoRA update, or
    array: np.ndarray | None = None  # a small in-memory tensor (LoRA A/B)
    # The family's transform of the whole tensor's float32 values (None: as stored); such a
    # tensor is read and encoded in one block, its rows possibly reordered.
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    # q4_k_m: the 16-bit type ("F16"/"BF16") llama.cpp's quantizer would have read the values
    # from; they are rounded to it before ggml quantizes them (None: encoded as they are).
    via: str | None = None

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def source_bytes(self) -> int:
        return self.ref.nbytes if self.ref is not None else self.array.nbytes


# float32 block -> encoded block, for the types numpy handles without gguf.quants.
_ENCODE = {
    "F32": lambda values: values,
    "F16": f32_to_f16,
    "BF16": f32_to_bf16,
}


# (stored dtype, GGUF type) -> raw block -> encoded block, where no float32 is needed.
_DIRECT = {
    ("BF16", "BF16"): lambda raw: raw,
    ("F16", "F16"): lambda raw: raw,
    ("F32", "F32"): lambda raw: raw,
    ("BF16", "F16"): bf16_to_f16,
}


def encode(values: np.ndarray, qtype, via: str | None = None) -> np.ndarray:
    """``values`` as ``qtype``; with ``via`` (llama.cpp's mixture), rounded through that 16-bit
    type first ("": they are 16-bit values already) and quantized by ggml."""
    if via is not None:  # as llama-quantize would from a 16-bit GGUF
        from qwen_mlx.export.llama_quant import ggml_quantize, through_16_bits

        values = through_16_bits(values, via) if via else values
        if qtype.name not in _ENCODE:
            return ggml_quantize(values, qtype)
    encoder = _ENCODE.get(qtype.name)
    if encoder is not None:
        return encoder(values)
    from gguf import quants

    return quants.quantize(values, qtype)


@dataclass
class EncodedBlock:
    """A block of one tensor's GGUF bytes; ``last`` ends the tensor."""

    job: TensorJob
    data: np.ndarray
    last: bool
    overflows: int  # float16 values that became ±inf


def _encode_rows(job: TensorJob, start: int, stop: int, raw: np.ndarray) -> np.ndarray:
    # With a LoRA update, encoded straight from float32: rounding the fused weight to the
    # base's bf16 first (as a fused folder stores it) would cost f16 three bits of precision.
    dtype = job.ref.dtype
    via = job.via
    if via == dtype and job.pair is None and job.transform is None:
        via = ""  # stored in the 16-bit type llama.cpp would read: rounding changes nothing
    encoder = partial(encode, qtype=job.qtype, via=via)
    if job.transform is not None:
        encoder = partial(_transformed, job.transform, encoder)
        return encode_rows(raw, dtype, (start, stop), job.pair, encoder)
    direct = _DIRECT.get((dtype, job.qtype.name))
    return encode_rows(raw, dtype, (start, stop), job.pair, encoder, direct)


def _transformed(transform, encoder, values: np.ndarray) -> np.ndarray:
    out = transform(values)
    if out.shape != values.shape:
        raise ValueError(f"a family's GGUF transform changed a shape {values.shape} → {out.shape}")
    return encoder(np.ascontiguousarray(out, dtype=np.float32))


def _block(job: TensorJob, rows: tuple[int, int] | None, last: bool, files: dict) -> EncodedBlock:
    if rows is None:
        values = np.asarray(job.array, dtype=np.float32)
        data = encode(values if job.transform is None else job.transform(values), job.qtype)
    else:
        raw = job.ref.pread(files[job.ref.path], *rows)
        data = _encode_rows(job, *rows, raw)
    overflows = f16_overflows(data) if job.qtype.name == "F16" else 0
    return EncodedBlock(job, data, last, overflows)


def _block_tasks(jobs: list[TensorJob]) -> Iterator[tuple[TensorJob, tuple[int, int] | None, bool]]:
    for job in jobs:
        if job.array is not None:
            yield job, None, True
            continue
        ranges = job.ref.block_ranges() if job.transform is None else [(0, job.ref.rows)]
        for i, rows in enumerate(ranges):
            yield job, rows, i == len(ranges) - 1


def encoded_stream(
    jobs: list[TensorJob], pool: Executor | None = None, ahead: int = IN_FLIGHT
) -> Iterator[EncodedBlock]:
    """Every tensor's GGUF bytes, in blocks of rows (quantized blocks never straddle rows),
    tensor after tensor in order. With a thread pool, the workers read and encode the next
    blocks, across tensor boundaries, while the caller writes this one: numpy, BLAS and file
    reads release the GIL, so the cores stay busy while memory holds a handful of blocks."""
    paths = {job.ref.path for job in jobs if job.ref is not None}
    files = {}
    try:
        for path in paths:
            files[path] = os.open(path, os.O_RDONLY)
        if pool is None:
            for task in _block_tasks(jobs):
                yield _block(*task, files)
            return
        pending: deque[Future] = deque()
        try:
            for task in _block_tasks(jobs):
                pending.append(pool.submit(_block, *task, files))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early: no worker may still be reading when the files close
            for future in pending:
                future.cancel()
            wait(pending)
    finally:
        for fd in files.values():
            os.close(fd)


def f16_overflows(block: np.ndarray) -> int:
    """How many values of a float16 block are ±inf (the source exceeded ±65504)."""
    return int(np.count_nonzero((block.view(np.uint16) & 0x7FFF) == 0x7C00))


def tensor_type(gguf, name: str, shape: tuple[int, ...], spec: QuantSpec, is_output: bool):
    """(GGML type, fallback note or None) for one model tensor."""
    types = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return types.F32, None
    if spec.weight is None:  # llama.cpp's mixture: chosen for all matrices at once (_mixture)
        return None, None
    qtype = types[spec.output if is_output else spec.weight]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        note = f"{name}: rows of {shape[-1]} are not a multiple of {block}; written as F16"
        return types.F16, note
    return qtype, None


def _order(name: str) -> tuple[int, str]:
    """GGUF order: token_embd, then block by block, then output_norm and output."""
    if name.startswith("token_embd"):
        return -1, name
    layer = _LAYER.match(name)
    return (int(layer.group(1)), name) if layer else (1 << 30, name)


def gguf_name(name_map, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise UserError(f"tensor {hf_name} is not part of this architecture; cannot export it")
    return found


def model_jobs(
    gguf,
    tensors: dict[str, TensorRef],
    name_map,
    adapter: Adapter | None,
    quant: str,
    transform: Callable[[str], Callable | None] = lambda name: None,
    arch: str = "",
    n_layer: int = 0,
) -> tuple[list[TensorJob], list[str]]:
    """The model's GGUF tensors in file order, plus notes about type fallbacks; ``name_map``
    is gguf's Hugging Face → GGUF name table of the model's architecture, ``transform`` the
    family's export transform of a tensor (by Hugging Face name); ``arch`` (GGUF's name) and
    ``n_layer`` decide llama.cpp's q4_k_m mixture."""
    spec = QUANTS[quant]
    # Tied models (Qwen2.5 0.5B–3B) have no lm_head: the embedding doubles as the output.
    output = "output.weight" if "lm_head.weight" in tensors else "token_embd.weight"
    jobs, notes = [], []
    for hf_name, ref in tensors.items():
        if _SKIP.fullmatch(hf_name):
            continue
        name = gguf_name(name_map, hf_name)
        qtype, note = tensor_type(gguf, name, ref.shape, spec, name == output)
        pair = adapter.for_weight(hf_name) if adapter is not None else None
        job = TensorJob(name, qtype, ref.shape, ref=ref, pair=pair, transform=transform(hf_name))
        jobs.append(job)
        notes += [note] if note else []
    if spec.weight is None:
        notes += _mixture(gguf, jobs, tensors, arch, n_layer)
    return sorted(jobs, key=lambda job: _order(job.name)), notes


def _mixture(gguf, jobs: list[TensorJob], tensors, arch: str, n_layer: int) -> list[str]:
    """Give every matrix the type llama.cpp's quantizer picks for q4_k_m (Q4_K, Q6_K on the
    output and some attn_v/ffn_down, Q5_0/Q8_0/F16 where rows are not a multiple of 256), to
    be quantized from the 16-bit values it would have read (bf16 for a bf16 model, else f16)."""
    from qwen_mlx.export.llama_quant import q4_k_m_types, quantizable

    via = intermediate_quant(tensors).upper()
    matrices = {job.name: job.shape for job in jobs if quantizable(job.name, job.shape)}
    chosen, fallbacks = q4_k_m_types(gguf, matrices, arch, n_layer)
    for job in jobs:
        if job.name in chosen:
            job.qtype, job.via = chosen[job.name], via
    assert all(job.qtype is not None for job in jobs)
    if not fallbacks:
        return []
    return [
        f"llama.cpp: {fallbacks} of {len(jobs)} tensor(s) required fallback quantization "
        "(rows not a multiple of 256)"
    ]


def lora_jobs(
    gguf,
    adapter: Adapter,
    name_map,
    quant: str,
    transform: Callable[[str], Callable | None] = lambda name: None,
) -> tuple[list[TensorJob], float]:
    """The adapter's ``.lora_a`` / ``.lora_b`` tensors and the alpha to record; the family's
    ``transform`` of a weight applies to its B, whose rows are the weight's (W += B @ A).

    llama.cpp scales each pair by alpha / r with one alpha per file; a pair whose own scale
    differs (rsLoRA, alpha_pattern) gets the difference folded into its B, exactly.
    """
    qtype = gguf.GGMLQuantizationType[QUANTS[quant].weight]
    first = next(iter(adapter.pairs.values()))
    alpha = first.scale * first.rank
    jobs = []
    for module, pair in adapter.pairs.items():
        base = gguf_name(name_map, module + ".weight")
        b = adapter.folded_b(module, alpha / pair.rank)
        # PEFT's A (r, in) and B (out, r) are already in the orientation llama.cpp wants.
        jobs.append(TensorJob(base + ".lora_a", qtype, pair.a.shape, array=pair.a))
        rows = transform(module + ".weight")
        jobs.append(TensorJob(base + ".lora_b", qtype, b.shape, array=b, transform=rows))
    return sorted(jobs, key=lambda job: _order(job.name)), float(alpha)


def intermediate_quant(tensors: dict[str, TensorRef]) -> str:
    """The 16-bit type llama.cpp's converter would write this model in losslessly, which its
    quantizer would then read: q4_k_m values are rounded through it."""
    return "bf16" if any(ref.dtype == "BF16" for ref in tensors.values()) else "f16"
