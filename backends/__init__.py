"""Backend registry: a name → lazy import path, and ``auto`` detection.

``get_backend("torch")`` imports ``qwen_mlx.backends.torch_trainer`` only when asked, so the
rest of qwen-mlx runs without torch or mlx installed. ``auto`` prefers MLX on Apple Silicon,
then PyTorch (CUDA, MPS, then CPU), then MLX on CPU.
"""

from __future__ import annotations

import importlib

from qwen_mlx.backends.base import Availability, Backend
from qwen_mlx.backends.probes import PROBES, is_apple_silicon
from qwen_mlx.errors import UserError

BACKENDS: dict[str, str] = {
    "mlx": "qwen_mlx.backends.mlx_trainer:MLXBackend",
    "torch": "qwen_mlx.backends.torch_trainer:TorchBackend",
}
CHOICES = ("auto", *BACKENDS)


def probe(name: str) -> Availability:
    """Whether backend ``name`` can run on this machine, and why."""
    _check_name(name)
    return PROBES[name]()


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}': choose one of {', '.join(CHOICES)}")


def detect() -> tuple[str, str]:
    """The backend ``auto`` picks here and the reason, e.g. ``("mlx", "Apple Silicon …")``."""
    order = ["mlx", "torch"] if is_apple_silicon() else ["torch", "mlx"]
    reasons = []
    for name in order:
        found = PROBES[name]()
        if found.ok:
            return name, found.reason
        reasons.append(f"{name}: {found.reason}")
    raise UserError("no training backend can run here (" + "; ".join(reasons) + ")")


def resolve(name: str) -> tuple[str, str]:
    """``auto`` → the detected backend; an explicit name is checked to be runnable."""
    if name == "auto":
        return detect()
    found = probe(name)
    if not found.ok:
        raise UserError(f"backend '{name}' cannot run here: {found.reason}")
    return name, found.reason


def get_backend(name: str) -> Backend:
    """An instance of the backend ``name`` (``auto`` allowed), imported on demand."""
    name, _ = resolve(name)
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise UserError(f"the {name} trainer is not included in this version of qwen-mlx") from None
    return getattr(module, class_name)()
