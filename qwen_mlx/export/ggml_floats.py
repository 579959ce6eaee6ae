"""float16 conversions through llama.cpp's ggml CPU library, where llama-cpp-python is installed.

Exporting a model to float16 GGUF converts hundreds of millions of weights. numpy's x86-64
wheels cast float32 → float16 one value at a time, and ``tensor_io``'s integer arithmetic
takes about 1.5 ns a value; ggml's CPU library converts 8 or 16 values per instruction
(F16C / AVX-512 on x86, NEON on Arm), about 0.1 ns a value. llama-cpp-python ships that
library (the ``gguf`` extra installs it for q4_k_m), so exports use it when it is there.

The library is opened with ctypes from llama-cpp-python's folder without importing
``llama_cpp`` (which would also load libllama). ctypes lets go of the GIL during each call,
so the export's worker threads convert at the same time.

Every function returns None where the library is missing, lacks the function (llama.cpp
before spring 2025), fails in any way, or gives a different float16 than numpy for any probe
value at load; callers then use numpy, so a changed or missing library can slow an export
down but never change or stop it. ``QWEN_MLX_GGML=0`` turns it off (benchmarks compare both
paths).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

# Where llama-cpp-python keeps ggml's CPU backend on Linux, macOS and Windows.
_FILE_NAMES = ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll", "libggml-cpu.dll")
# Below this many values the ctypes call costs more than it saves.
_MIN_VALUES = 4096
_LOAD_LOCK = threading.Lock()


class _Ggml:
    """The two ggml CPU functions used here, typed for ctypes."""

    def __init__(self, library: ctypes.CDLL):
        signature = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        # void ggml_cpu_fp32_to_fp16(const float *, ggml_fp16_t *, int64_t n), and bf16 → fp32
        self.fp32_to_fp16 = library.ggml_cpu_fp32_to_fp16
        self.bf16_to_fp32 = library.ggml_cpu_bf16_to_fp32
        for function in (self.fp32_to_fp16, self.bf16_to_fp32):
            function.argtypes, function.restype = signature, None
        if hasattr(library, "ggml_cpu_init"):  # idempotent; sets up ggml's own lookup tables
            library.ggml_cpu_init()


def library_folder() -> Path | None:
    """llama-cpp-python's folder of shared libraries (ggml's among them), or None."""
    try:
        spec = importlib.util.find_spec("llama_cpp")  # finds the package, does not run it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _library_file() -> Path | None:
    if os.environ.get("QWEN_MLX_GGML", "1") == "0":
        return None
    folder = library_folder()
    if folder is None:
        return None
    return next((folder / name for name in _FILE_NAMES if (folder / name).is_file()), None)


def _probe_values() -> np.ndarray:
    """float32 values covering every exponent, both signs, subnormals, ±inf and the values
    just below, at and above each float16 rounding tie. No NaNs: ggml keeps them NaN but may
    set a different payload bit than numpy."""
    spread = np.arange(0, 1 << 32, 65521, dtype=np.uint64).astype(np.uint32)
    ties = (np.arange(1, 255, dtype=np.uint32) << 23) | 0x1000
    bits = np.concatenate([spread, ties, ties | 0x2000, ties - 1, ties + 1])
    values = np.concatenate([bits, bits | 0x80000000]).view(np.float32)
    return values[~np.isnan(values)]


def _agrees_with_numpy(ggml: _Ggml) -> bool:
    values = _probe_values()
    with np.errstate(all="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    halves = _to_halves(ggml, values).view(np.uint16)
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFC00001], dtype=np.uint32).view(np.float32)
    if not np.isnan(_to_halves(ggml, nans)).all():
        return False
    bf16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = np.empty(bf16.shape, dtype=np.float32)
    ggml.bf16_to_fp32(bf16.ctypes.data, widened.ctypes.data, bf16.size)
    shifted = (bf16.astype(np.uint32) << 16).view(np.float32)
    finite = ~np.isnan(shifted)
    return np.array_equal(halves, expected) and np.array_equal(
        widened[finite].view(np.uint32), shifted[finite].view(np.uint32)
    )


@functools.cache
def _load() -> _Ggml | None:
    path = _library_file()
    if path is None:
        return None
    try:
        if hasattr(os, "add_dll_directory"):  # Windows: ggml-cpu.dll needs ggml-base.dll
            os.add_dll_directory(str(path.parent))
        ggml = _Ggml(ctypes.CDLL(str(path)))
        return ggml if _agrees_with_numpy(ggml) else None
    except Exception:  # unloadable, too old to have these functions, or failing: use numpy
        return None


def _ggml() -> _Ggml | None:
    with _LOAD_LOCK:  # worker threads ask at once; load and check only once
        return _load()


def available() -> bool:
    """Whether float16 conversions go through ggml in this process."""
    return _ggml() is not None


def _to_halves(ggml: _Ggml, values: np.ndarray) -> np.ndarray:
    """float16 of a contiguous float32 array, converted by ggml."""
    halves = np.empty(values.shape, dtype=np.uint16)
    ggml.fp32_to_fp16(values.ctypes.data, halves.ctypes.data, values.size)
    return halves.view(np.float16)


def _worth_it(array: np.ndarray) -> _Ggml | None:
    return _ggml() if array.size >= _MIN_VALUES else None


def _or_none(convert):
    """``convert`` returning None (numpy's turn) instead of raising: a library that passed
    the load check and fails later must not stop an export."""

    @functools.wraps(convert)
    def guarded(array: np.ndarray) -> np.ndarray | None:
        ggml = _worth_it(array)
        if ggml is None:
            return None
        try:
            return convert(ggml, array)
        except Exception:
            return None

    return guarded


@_or_none
def f32_to_f16(ggml: _Ggml, values: np.ndarray) -> np.ndarray:
    """float16 of float32 ``values`` (round to nearest even, overflow to ±inf), or None."""
    return _to_halves(ggml, np.ascontiguousarray(values, np.float32))


@_or_none
def bf16_to_f16(ggml: _Ggml, bits: np.ndarray) -> np.ndarray:
    """float16 of bfloat16 bit patterns (uint16), through float32 as a cast would, or None."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    values = np.empty(bits.shape, dtype=np.float32)
    ggml.bf16_to_fp32(bits.ctypes.data, values.ctypes.data, bits.size)
    return _to_halves(ggml, values)
