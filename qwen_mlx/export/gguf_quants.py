"""The ``--quant`` choices of ``qwen-mlx export`` and the GGUF types each one writes.

Kept apart from the writer (and free of numpy) so the CLI can list the choices without
importing the export machinery.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantSpec:
    """A ``--quant`` choice: the file's nominal type and the matrices' GGML types."""

    file_type: str  # gguf.LlamaFileType member
    weight: str | None  # gguf.GGMLQuantizationType member for matrices
    output: str | None  # … for the output matrix
    needs_llama_cpp: bool = False


QUANTS = {
    "f32": QuantSpec("ALL_F32", "F32", "F32"),
    "f16": QuantSpec("MOSTLY_F16", "F16", "F16"),
    "bf16": QuantSpec("MOSTLY_BF16", "BF16", "BF16"),
    "q8_0": QuantSpec("MOSTLY_Q8_0", "Q8_0", "Q8_0"),
    "q4_0": QuantSpec("MOSTLY_Q4_0", "Q4_0", "Q8_0"),
    "q4_k_m": QuantSpec("MOSTLY_Q4_K_M", None, None, needs_llama_cpp=True),
}
# What --quant offers; f32 only for --lora-only (a full f32 model doubles f16 for no gain).
QUANT_CHOICES = tuple(name for name in QUANTS if name != "f32")
LORA_QUANTS = ("f32", "f16", "bf16")
