"""``qwen-mlx adapter convert``: a LoRA adapter between PEFT's format and mlx-lm's.

Also the PEFT ``adapter_config.json`` every backend writes. Each layer's update
is kept exactly: weights stay float32, and per-layer scales that mlx-lm cannot express are
folded into B.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_mlx.adapters import LAYER, MLX_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, Adapter, load_adapter
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_json
from qwen_mlx.outputs import output_dir
from qwen_mlx.tensor_io import save_f32

# What `peft` writes besides r/alpha/dropout/targets, so PeftModel reads our files as its own.
PEFT_DEFAULTS = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "revision": None,
}


def peft_config(
    base_model: str | None, rank: int, alpha: float, dropout: float, targets: list[str]
) -> dict:
    """A PEFT ``adapter_config.json`` (keys sorted), as every backend and ``convert`` write."""
    config = {
        **PEFT_DEFAULTS,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(targets),
    }
    return dict(sorted(config.items()))


def _peft_config(adapter: Adapter, rank: int, scale: float) -> dict:
    leaves = {module.rsplit(".", 1)[-1] for module in adapter.pairs}
    return peft_config(adapter.base_model, rank, scale * rank, adapter.dropout, list(leaves))


def _mlx_config(adapter: Adapter, rank: int, scale: float) -> dict:
    keys = set()
    for module in adapter.pairs:
        match = LAYER.fullmatch(module)
        if match is None:
            raise UserError(f"{adapter.path}: mlx-lm adapters only cover layers, not {module}")
        keys.add(match["rest"])
    return {
        "fine_tune_type": "lora",
        "model": adapter.base_model,
        # -1: every layer gets LoRA modules; layers the adapter lacks keep lora_b = 0.
        "num_layers": -1,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": adapter.dropout,
            "keys": sorted(keys),
        },
    }


def _peft_tensors(adapter: Adapter, scale: float) -> dict[str, np.ndarray]:
    tensors = {}
    for module, pair in adapter.pairs.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = pair.a
        tensors[f"base_model.model.{module}.lora_B.weight"] = adapter.folded_b(module, scale)
    return tensors


def _mlx_tensors(adapter: Adapter, scale: float) -> dict[str, np.ndarray]:
    tensors = {}
    for module, pair in adapter.pairs.items():
        tensors[f"{module}.lora_a"] = pair.a.T
        tensors[f"{module}.lora_b"] = adapter.folded_b(module, scale).T
    return tensors


# target format -> (weights file, tensors, adapter_config.json)
_WRITERS = {
    "peft": (PEFT_WEIGHTS, _peft_tensors, _peft_config),
    "mlx-lm": (MLX_WEIGHTS, _mlx_tensors, _mlx_config),
}
FORMATS = tuple(_WRITERS)


def convert_adapter(adapter_dir: Path, to: str, out_dir: Path, force: bool = False) -> Path:
    """Write the adapter in ``adapter_dir`` (PEFT or mlx-lm) as a ``to`` adapter in ``out_dir``.

    The update each layer applies is unchanged (float32 weights); per-layer scales, which
    mlx-lm cannot express, are folded into B. ``out_dir`` is replaced as ``fuse`` does.
    """
    if to not in _WRITERS:
        raise UserError(f"unknown adapter format '{to}': choose one of {', '.join(FORMATS)}")
    path = Path(adapter_dir)
    if not path.is_dir():
        raise UserError(f"adapter folder {path} not found")
    adapter = load_adapter(path if (path / PEFT_CONFIG).is_file() else path / "adapter")
    rank, scale = adapter.common_scale()
    weights_name, tensors, config = _WRITERS[to]
    with output_dir(out_dir, "adapter convert", force, (adapter.path,)) as tmp:
        save_f32(tmp / weights_name, tensors(adapter, scale))
        write_json(tmp / PEFT_CONFIG, config(adapter, rank, scale))
    return Path(out_dir)
