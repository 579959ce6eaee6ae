"""llama.cpp's K-quant mixture (q4_k_m), written tensor by tensor as the export streams.

gguf-py can write F16/BF16/Q8_0/Q4_0 itself but not K-quants, which need llama.cpp's C code:
each block of rows is quantized by ggml's own ``ggml_quantize_chunk`` from the ggml library
llama-cpp-python ships (through ctypes, which lets go of the GIL, so the export's worker
threads quantize at the same time). The type of each tensor is chosen as llama.cpp's
quantizer (``llama_tensor_get_type`` in src/llama-quant.cpp) chooses it for Q4_K_M without an
importance matrix, and the values are first rounded to the 16-bit type that llama.cpp would
have read them from (the F16/BF16 GGUF its converter writes), so the tensors come out
byte-identical to ``convert_hf_to_gguf.py`` + ``llama-quantize`` and no 16-bit file is written.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading

import numpy as np

from qwen_mlx.errors import UserError
from qwen_mlx.export import ggml_floats
from qwen_mlx.tensor_io import f32_to_bf16, f32_to_f16

# Where llama-cpp-python keeps ggml's base library (the quantizers) on Linux, macOS, Windows.
_FILE_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml-base.dll")
_LOAD_LOCK = threading.Lock()
_LAYER = re.compile(r"blk\.(\d+)\.")


def require_llama_cpp():
    """The llama_cpp module, or a one-line error naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "--quant q4_k_m needs llama-cpp-python: pip install 'qwen-mlx[gguf]'"
        ) from None
    return llama_cpp


# ---------------------------------------------------------------- ggml's quantizer


@functools.cache
def _load_quantize_chunk():
    folder = ggml_floats.library_folder()
    path = (
        next((folder / n for n in _FILE_NAMES if (folder / n).is_file()), None) if folder else None
    )
    if path is None:
        raise UserError("--quant q4_k_m needs llama-cpp-python: pip install 'qwen-mlx[gguf]'")
    if hasattr(os, "add_dll_directory"):
        os.add_dll_directory(str(path.parent))
    try:
        library = ctypes.CDLL(str(path))
        function, validate = library.ggml_quantize_chunk, library.ggml_validate_row_data
    except (OSError, AttributeError) as err:
        raise UserError(f"llama-cpp-python's ggml library cannot quantize ({err})") from None
    # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float * imatrix)
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    function.restype = ctypes.c_size_t
    # bool ggml_validate_row_data(type, const void * data, size_t nbytes): no inf/NaN scales
    validate.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    validate.restype = ctypes.c_bool
    return function, validate


def _quantize_chunk():
    with _LOAD_LOCK:  # worker threads ask at once; load only once
        return _load_quantize_chunk()


def ggml_quantize(values: np.ndarray, qtype) -> np.ndarray:
    """Rows of float32 ``values`` (…, n) as GGML type ``qtype``: uint8 (rows, bytes per row),
    computed by ggml itself (no importance matrix, as llama-quantize without --imatrix)."""
    from gguf import GGML_QUANT_SIZES

    values = np.ascontiguousarray(values, dtype=np.float32)
    n_per_row = values.shape[-1]
    rows = values.size // n_per_row
    block, size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"rows of {n_per_row} are not a multiple of {qtype.name}'s {block}")
    out = np.empty((rows, n_per_row // block * size), dtype=np.uint8)
    quantize, validate = _quantize_chunk()
    written = quantize(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, n_per_row, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes of {qtype.name}, not {out.nbytes}")
    if not validate(int(qtype), out.ctypes.data, out.nbytes):  # llama-quantize checks too
        raise UserError(
            f"{qtype.name} quantization gave inf or NaN (as llama-quantize would refuse to): "
            "the model has inf/NaN weights or ones beyond float16's range; try --quant bf16"
        )
    return out


def through_16_bits(values: np.ndarray, via: str) -> np.ndarray:
    """float32 ``values`` as llama.cpp reads them back from a ``via`` (F16/BF16) GGUF."""
    if via == "BF16":
        return (f32_to_bf16(values).astype(np.uint32) << 16).view(np.float32)
    return f32_to_f16(values).astype(np.float32)


# ---------------------------------------------------------------- the Q4_K_M mixture


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third
    one between them get the bigger type."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _weight_order(name: str) -> tuple[int, str]:
    """The order llama.cpp's quantizer visits tensors in (its counters depend on it): by
    layer (non-layer tensors first), then by name."""
    layer = _LAYER.match(name)
    return (int(layer.group(1)) if layer else -1, name)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp's quantizer quantizes this tensor at all (else it is copied)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def q4_k_m_types(gguf, names_shapes: dict[str, tuple[int, ...]], arch: str, n_layer: int):
    """GGML type of every quantized matrix of a Q4_K_M file, and how many fell back for rows
    not a multiple of 256, as llama.cpp's quantizer decides for a dense ``arch`` model of
    ``n_layer`` blocks without an importance matrix. ``names_shapes`` maps the GGUF names of
    the matrices llama.cpp quantizes to their numpy shapes (ne0 = the last axis)."""
    types = gguf.GGMLQuantizationType
    sizes = gguf.GGML_QUANT_SIZES
    tied = "output.weight" not in names_shapes
    # llama.cpp's model type LLM_TYPE_70B (Qwen2-72B's 80 layers) bumps attn_v a step.
    is_70b = arch == "qwen2" and n_layer == 80
    n_attn_v = sum(1 for name in names_shapes if "attn_v.weight" in name)
    i_attn_v = i_ffn_down = 0
    chosen, fallbacks = {}, 0
    for name in sorted(names_shapes, key=_weight_order):
        ne0 = names_shapes[name][-1]
        qtype = types.Q4_K
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            qtype = types.Q8_0 if ne0 % sizes[types.Q4_K][0] else types.Q6_K
        elif "attn_v.weight" in name:
            if _more_bits(i_attn_v, n_attn_v):
                qtype = types.Q6_K
            if is_70b and qtype == types.Q4_K:
                qtype = types.Q5_K
            i_attn_v += 1
        elif "ffn_down" in name:
            if _more_bits(i_ffn_down, n_layer):
                qtype = types.Q6_K
            i_ffn_down += 1
        if ne0 % sizes[qtype][0]:  # llama.cpp's tensor_type_fallback
            fallbacks += 1
            qtype = {types.Q4_K: types.Q5_0, types.Q5_K: types.Q5_1, types.Q6_K: types.Q8_0}.get(
                qtype, qtype
            )
            if ne0 % sizes[qtype][0]:
                qtype = types.F16
        chosen[name] = qtype
    return chosen, fallbacks
