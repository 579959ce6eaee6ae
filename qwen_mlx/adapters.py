"""LoRA adapters: read them, find their base model, convert between PEFT and mlx-lm.

Every backend writes PEFT's format (DESIGN §5): ``W += (lora_alpha / r) · B @ A``. This module
reads that (and mlx-lm's ``adapters.safetensors``, so an adapter trained with ``mlx_lm.lora``
works too) into one in-memory shape, :class:`Adapter`, that ``fuse`` and ``export`` apply
tensor by tensor. Only numpy: no torch, no mlx.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import output_dir, write_json
from qwen_mlx.tensor_io import index_file, save_f32

RUN_CONFIG = "config.yaml"  # the run folder's resolved config (qwen_mlx.training_run)
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_MLX_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[ab])")
_LAYER = re.compile(r"model\.layers\.(?P<n>\d+)\.(?P<rest>.+)")
_PRODUCT_ELEMENTS = 32 * 1024


@dataclass
class LoraPair:
    """One adapted linear layer: ``delta = scale · b @ a``, a (r, in), b (out, r), float32."""

    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @cached_property
    def scaled_b(self) -> np.ndarray:
        return self.b * np.float32(self.scale)

    def delta(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the weight update, float32."""
        b = self.scaled_b[start:stop]
        out = np.empty((b.shape[0], self.a.shape[1]), dtype=np.float32)
        # Products of at most _PRODUCT_ELEMENTS outputs: OpenBLAS runs those on one thread.
        # Bigger ones it splits across threads, which with an inner dimension only r wide
        # spends more time waking threads than multiplying (measured: 0.4 vs 7 ns/element).
        step = max(1, _PRODUCT_ELEMENTS // self.a.shape[1])
        for i in range(0, b.shape[0], step):
            np.matmul(b[i : i + step], self.a, out=out[i : i + step])
        return out


@dataclass
class Adapter:
    """A LoRA adapter in memory, whatever format it came in. ``pairs`` is keyed by module
    name as in the base model (``model.layers.0.self_attn.q_proj``)."""

    path: Path
    format: str  # "peft" or "mlx-lm"
    base_model: str | None
    dropout: float
    pairs: dict[str, LoraPair] = field(default_factory=dict)

    def for_weight(self, weight_name: str) -> LoraPair | None:
        """The pair that updates base tensor ``weight_name`` (``….q_proj.weight``), if any."""
        return self.pairs.get(weight_name.removesuffix(".weight"))

    def common_scale(self) -> tuple[int, float]:
        """The (rank, scale) every pair shares, as single-scale formats need (see folded_b)."""
        ranks = {pair.rank for pair in self.pairs.values()}
        if len(ranks) != 1:
            raise UserError(f"{self.path}: LoRA ranks differ between layers {sorted(ranks)}")
        return ranks.pop(), next(iter(self.pairs.values())).scale

    def folded_b(self, module: str, scale: float) -> np.ndarray:
        """B of ``module`` rescaled so that ``scale`` gives its true update (exact)."""
        pair = self.pairs[module]
        return pair.b if pair.scale == scale else pair.b * np.float32(pair.scale / scale)


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read a PEFT or mlx-lm LoRA adapter folder; any other layout is a one-line error."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / PEFT_WEIGHTS).is_file():
        return _load_peft(adapter_dir)
    if (adapter_dir / MLX_WEIGHTS).is_file():
        return _load_mlx(adapter_dir)
    if (adapter_dir / "adapter_model.bin").is_file():
        raise UserError(f"{adapter_dir}: only safetensors adapters are supported, not .bin")
    raise UserError(f"{adapter_dir} holds no {PEFT_WEIGHTS} or {MLX_WEIGHTS}")


def _check_peft_config(path: Path, config: dict) -> None:
    problems = {
        "is not a LoRA adapter": config.get("peft_type", "LORA") != "LORA",
        "is a DoRA adapter (not supported)": bool(config.get("use_dora")),
        "uses fan_in_fan_out (GPT-2 style, not supported)": bool(config.get("fan_in_fan_out")),
    }
    for why, bad in problems.items():
        if bad:
            raise UserError(f"{path} {why}")


def _peft_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha/r (or alpha/√r with rsLoRA), per-module alpha."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _read_halves(adapter_dir: Path, weights: str, key_pattern: re.Pattern) -> dict[str, dict]:
    """``{module: {"A"|"B"|"a"|"b": float32 array}}`` from the adapter's weights file."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, ref in index_file(adapter_dir / weights).items():
        match = key_pattern.fullmatch(key)
        if match is None:
            raise UserError(f"{adapter_dir}: {key} is not a LoRA A/B weight (not supported)")
        halves.setdefault(match["module"], {})[match["ab"]] = ref.read_f32()
    return halves


def _load_peft(adapter_dir: Path) -> Adapter:
    config = _read_json(adapter_dir / PEFT_CONFIG)
    _check_peft_config(adapter_dir, config)
    halves = _read_halves(adapter_dir, PEFT_WEIGHTS, _PEFT_KEY)
    pairs = {}
    for module, ab in _complete(adapter_dir, halves, "A", "B").items():
        scale = _peft_scale(config, module, ab["A"].shape[0])
        pairs[module] = LoraPair(ab["A"], ab["B"], scale)
    base = config.get("base_model_name_or_path")
    return Adapter(adapter_dir, "peft", base, float(config.get("lora_dropout", 0.0)), pairs)


def _load_mlx(adapter_dir: Path) -> Adapter:
    config = _read_json(adapter_dir / PEFT_CONFIG)
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{adapter_dir} is a {config['fine_tune_type']} adapter, not LoRA")
    params = config.get("lora_parameters") or {}
    if "scale" not in params:
        raise UserError(f"{adapter_dir}/{PEFT_CONFIG} lacks lora_parameters.scale")
    halves = _read_halves(adapter_dir, MLX_WEIGHTS, _MLX_KEY)
    # mlx-lm stores the transposes: lora_a (in, r), lora_b (r, out).
    pairs = {
        module: LoraPair(ab["a"].T.copy(), ab["b"].T.copy(), float(params["scale"]))
        for module, ab in _complete(adapter_dir, halves, "a", "b").items()
    }
    dropout = float(params.get("dropout", 0.0))
    return Adapter(adapter_dir, "mlx-lm", config.get("model"), dropout, pairs)


def _complete(adapter_dir: Path, halves: dict, a: str, b: str) -> dict:
    for module, ab in halves.items():
        if set(ab) != {a, b}:
            raise UserError(f"{adapter_dir}: {module} has lora_{a} or lora_{b} missing")
    if not halves:
        raise UserError(f"{adapter_dir} holds no LoRA weights")
    return dict(sorted(halves.items()))


# ---------------------------------------------------------------- run / adapter / base model


@dataclass
class Source:
    """What ``fuse`` and ``export`` work from: a base model folder and maybe an adapter."""

    model_dir: Path
    adapter: Adapter | None = None
    run_config: object | None = None  # qwen_mlx.config.Config of the run, when there is one

    @property
    def system_prompt(self) -> str | None:
        return self.run_config.data.system_prompt if self.run_config else None

    @property
    def qlora_note(self) -> str | None:
        """What to tell users whose adapter was trained on a 4/8-bit base (QLoRA)."""
        quant = self.run_config.model.quantization if self.run_config else None
        if quant not in ("4bit", "8bit"):
            return None
        return (
            f"the adapter was trained on a {quant} base; it is applied to the full-precision "
            "base weights (the standard QLoRA practice)"
        )


def _locate(path: Path) -> tuple[Path | None, Path | None]:
    """(adapter dir, run dir) for a run folder or an adapter folder; (None, None) otherwise."""
    if (path / PEFT_CONFIG).is_file():
        run = path.parent if (path.parent / RUN_CONFIG).is_file() else None
        return path, run
    if (path / "adapter" / PEFT_CONFIG).is_file():
        return path / "adapter", path
    return None, None


def resolve_source(run_or_adapter: Path | None, model: Path | None) -> Source:
    """The base model and adapter behind a run folder, an adapter folder or ``--model``.

    The base is ``--model`` if given, else the run's ``model.path``, else the adapter's
    ``base_model_name_or_path``. A model folder given as the positional argument is taken
    as ``--model``.
    """
    if run_or_adapter is None:
        if model is None:
            raise UserError("give a run or adapter folder, or --model DIR")
        return Source(_check_model(model))
    path = Path(run_or_adapter)
    if not path.is_dir():
        raise UserError(f"{path} not found: give a run folder (outputs/<run>) or an adapter folder")
    adapter_dir, run_dir = _locate(path)
    if adapter_dir is None:
        if model is None and (path / "config.json").is_file():
            return Source(_check_model(path))
        raise UserError(
            f"{path} is neither a run folder (with adapter/) nor an adapter folder "
            f"(with {PEFT_CONFIG})"
        )
    run_config = _load_run_config(run_dir) if run_dir else None
    adapter = load_adapter(adapter_dir)
    return Source(_base_model(adapter, run_config, run_dir, model), adapter, run_config)


def _load_run_config(run_dir: Path):
    from qwen_mlx.config import load_config

    return load_config(run_dir / RUN_CONFIG)


def _base_model(adapter: Adapter, run_config, run_dir: Path | None, model: Path | None) -> Path:
    if model is not None:
        return _check_model(model)
    named = run_config.model.path if run_config else adapter.base_model
    if not named:
        raise UserError(f"{adapter.path} does not name its base model: pass --model DIR")
    # A relative path was relative to where training ran: usually here, maybe the run's parent.
    anchors = [Path.cwd(), *(p for p in (run_dir, adapter.path) if p)]
    for anchor in anchors:
        candidate = anchor / named
        if (candidate / "config.json").is_file():
            return candidate
    hint = f"`qwen-mlx download {named}` or " if re.fullmatch(r"[\w.-]+/[\w.-]+", named) else ""
    raise UserError(f"base model {named} of {adapter.path} not found: {hint}pass --model DIR")


def _check_model(model: Path) -> Path:
    if not (Path(model) / "config.json").is_file():
        raise UserError(f"model folder {model} not found (no config.json)")
    return Path(model)


# ---------------------------------------------------------------- conversion


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
        match = _LAYER.fullmatch(module)
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
