"""llama.cpp's own quantizer, through llama-cpp-python: the K-quants (q4_k_m) ollama users expect.

gguf-py can write F16/BF16/Q8_0/Q4_0 itself but not K-quants, which need llama.cpp's C code.
Its log (a line per tensor) is collected rather than printed, and searched for the error or
the fallback warning that is the only report llama.cpp gives.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

from qwen_mlx.errors import UserError


def require_llama_cpp():
    """The llama_cpp module, or a one-line error naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "--quant q4_k_m needs llama-cpp-python: pip install 'qwen-mlx[gguf]'"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def _collected_log(llama_cpp) -> Iterator[list[str]]:
    """llama.cpp's log lines, kept in a list instead of printed, while the block runs."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp._logger import llama_log_callback  # llama-cpp-python's own printer

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def llama_quantize(src: Path, dst: Path, file_type: int) -> list[str]:
    """Quantize the F16/BF16 GGUF ``src`` into ``dst`` as llama.cpp file type ``file_type``.

    Returns notes: llama.cpp swaps K-quants for Q5_0/Q8_0 on matrices whose rows are not a
    multiple of 256 (most of Qwen2.5-0.5B's), and says so only in its log.
    """
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    with _collected_log(llama_cpp) as log:
        status = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    lines = [line.strip() for line in "".join(log).splitlines()]
    if status != 0:
        errors = [line for line in lines if "error" in line.lower() or "failed" in line]
        raise UserError(f"llama.cpp's quantizer failed: {(errors or ['no details'])[-1]}")
    fallback = [line for line in lines if "required fallback quantization" in line]
    return [
        f"llama.cpp: {line.split('WARNING: ')[-1]} (rows not a multiple of 256)"
        for line in fallback
    ]
