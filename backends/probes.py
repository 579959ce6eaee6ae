"""Cheap checks of what each backend needs, used by ``auto`` detection and ``check``.

These import at most the framework itself (never a trainer module), and never raise.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform

from qwen_mlx.backends.base import Availability


def package_versions(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Installed versions of ``names``, and the names that are missing."""
    found, missing = {}, []
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return found, missing


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def probe_mlx() -> Availability:
    found, missing = package_versions(["mlx", "mlx-lm", "transformers"])
    if missing:
        return Availability(
            False, f"missing {', '.join(missing)}: pip install 'qwen-mlx[mlx]'", packages=found
        )
    try:
        importlib.import_module("mlx.core")
    except Exception as err:  # a broken wheel must not crash `check`
        return Availability(False, f"mlx is installed but does not load ({err})", packages=found)
    if is_apple_silicon():
        return Availability(True, "Apple Silicon with MLX (Metal GPU)", "metal", found)
    return Availability(True, "MLX on CPU (reference BLAS: fine for tests, slow)", "cpu", found)


def probe_torch() -> Availability:
    found, missing = package_versions(["torch", "transformers", "peft", "accelerate"])
    if missing:
        return Availability(
            False, f"missing {', '.join(missing)}: pip install 'qwen-mlx[torch]'", packages=found
        )
    try:
        torch = importlib.import_module("torch")
    except Exception as err:
        return Availability(False, f"torch is installed but does not load ({err})", packages=found)
    bnb, _ = package_versions(["bitsandbytes"])
    found.update(bnb)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Availability(True, f"NVIDIA GPU: {name}", "cuda", found)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Availability(True, "PyTorch on Apple MPS (no MLX installed)", "mps", found)
    return Availability(
        True, "PyTorch on CPU: no CUDA GPU found (slow, hours for 3B)", "cpu", found
    )


PROBES = {"mlx": probe_mlx, "torch": probe_torch}
