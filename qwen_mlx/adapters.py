"""LoRA adapters: read them and find their base model (converting: :mod:`adapter_convert`).

Every backend writes PEFT's format: ``W += (lora_alpha / r) · B @ A``. This module
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
from qwen_mlx.run_dir import RUN_CONFIG
from qwen_mlx.tensor_io import index_file

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_MLX_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[ab])")
LAYER = re.compile(r"model\.layers\.(?P<n>\d+)\.(?P<rest>.+)")
_PRODUCT_ELEMENTS = 32 * 1024
_HUB_PART = re.compile(r"[\w][\w.-]*")


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


# PEFT inits that also change the base weights: the adapter alone is only right on the base
# PEFT rewrote, until PEFT converts it to a plain LoRA of the original base.
_CONVERT = (
    "save it again with PEFT's `save_pretrained(..., "
    "path_initial_model_for_weight_conversion=<the adapter saved before training>)`, which "
    "turns it into a plain LoRA of the original base"
)
_BASE_CHANGING_INITS = {
    "pissa": _CONVERT,
    "olora": _CONVERT,
    "corda": _CONVERT,
    "loftq": (
        "it only fits the base LoftQ quantized, so merge it with PEFT (`merge_and_unload`) "
        "on that base and pass the merged folder as --model"
    ),
}
_NO_LORA_FIX = "or merge it with PEFT (`merge_and_unload`) and pass the merged folder as --model"


def _base_changing_init(config: dict) -> str | None:
    init = config.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    return next((k for k in _BASE_CHANGING_INITS if init.lower().startswith(k)), None)


def _peft_option_problems(config: dict) -> list[tuple[bool, str]]:
    """``(whether it applies, the PEFT option at fault and what to do)`` for each option
    that makes an adapter more than LoRA A/B pairs."""
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    saved, bias = config.get("modules_to_save"), config.get("bias", "none")
    return [
        (
            bool(saved),
            f"sets modules_to_save={saved}: it holds whole trained copies of those layers, "
            f"which fuse and export cannot apply; train with modules_to_save=None, {_NO_LORA_FIX}",
        ),
        (
            bias != "none",
            f"sets bias={bias!r}: it holds trained biases besides LoRA A/B; train with "
            f"bias='none', {_NO_LORA_FIX}",
        ),
        (
            bool(config.get("lora_bias")),
            "sets lora_bias=true: lora_B has a bias, which fuse and export cannot apply; "
            f"train with lora_bias=False, {_NO_LORA_FIX}",
        ),
        (
            any("embed_tokens" in t for t in targets),
            "targets embed_tokens: a LoRA on the embeddings is not supported; train without "
            f"embed_tokens in target_modules, {_NO_LORA_FIX}",
        ),
    ]


def _check_peft_config(path: Path, config: dict) -> None:
    problems = {
        "is not a LoRA adapter": config.get("peft_type", "LORA") != "LORA",
        "is a DoRA adapter (not supported)": bool(config.get("use_dora")),
        "uses fan_in_fan_out (GPT-2 style, not supported)": bool(config.get("fan_in_fan_out")),
    }
    init = _base_changing_init(config)
    if init:
        why = f"was made with init_lora_weights={config['init_lora_weights']!r}, which also"
        problems[f"{why} changes the base weights: {_BASE_CHANGING_INITS[init]}"] = True
    for why, bad in problems.items():
        if bad:
            raise UserError(f"{path} {why}")
    for bad, why in _peft_option_problems(config):
        if bad:
            raise UserError(f"{path / PEFT_CONFIG} {why}")


_PATTERNS = {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}  # PEFT's per-module keys


def _per_module(config: dict, key: str, module: str, default):
    """``config[key]`` for ``module``, with PEFT's per-module override (``rank_pattern``…)."""
    for pattern, override in (config.get(_PATTERNS[key]) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return override
    return config.get(key, default)


def _peft_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha/r (or alpha/√r with rsLoRA), per-module alpha."""
    alpha = _per_module(config, "lora_alpha", module, 8)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _peft_targets(config: dict, module: str) -> bool:
    """Whether PEFT, reading this config, would put a LoRA layer on ``module``."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_agreement(adapter_dir: Path, module: str, rank: int, said: int, targeted: bool) -> None:
    """The config and the weights of an adapter must describe the same layers, or tools
    that build layers from the config (PEFT, mlx-lm) and ones that read the weights (fuse,
    export) would run different models."""
    if rank != said:
        why = f"says rank {said} but the weights of {module} have rank {rank}"
    elif not targeted:
        why = f"does not target {module}, which the weights adapt"
    else:
        return
    raise UserError(
        f"{adapter_dir / PEFT_CONFIG} {why}: the config and the weights do not belong "
        "together (copy the adapter again, or train it again)"
    )


# Weights PEFT saves besides LoRA A/B whose config does not say so: what made PEFT write them.
_EXTRA_WEIGHTS = {
    r".*embed_tokens(\.base_layer)?\.weight": (
        "is the whole embedding layer, saved by PEFT's save_embedding_layers (on when the "
        "vocabulary was resized); save the adapter with save_embedding_layers=False"
    ),
    r".*\.lora_embedding_[AB]": "is a LoRA on the embeddings; train without embed_tokens",
    r".*\.bias": "is a trained bias; train with bias='none' and lora_bias=False",
}


def _extra_weight(key: str) -> str:
    why = next((v for k, v in _EXTRA_WEIGHTS.items() if re.fullmatch(k, key)), None)
    return f"{why or 'is not a LoRA A/B weight'} ({_NO_LORA_FIX})"


def _read_halves(adapter_dir: Path, weights: str, key_pattern: re.Pattern) -> dict[str, dict]:
    """``{module: {"A"|"B"|"a"|"b": float32 array}}`` from the adapter's weights file."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    fix = "the adapter is incomplete: copy it again, or train it again"
    for key, ref in index_file(adapter_dir / weights, fix).items():
        match = key_pattern.fullmatch(key)
        if match is None:
            raise UserError(f"{adapter_dir}: {key} {_extra_weight(key)}")
        halves.setdefault(match["module"], {})[match["ab"]] = ref.read_f32()
    return halves


def _load_peft(adapter_dir: Path) -> Adapter:
    config = _read_json(adapter_dir / PEFT_CONFIG)
    _check_peft_config(adapter_dir, config)
    halves = _read_halves(adapter_dir, PEFT_WEIGHTS, _PEFT_KEY)
    pairs = {}
    for module, ab in _complete(adapter_dir, halves, "A", "B").items():
        rank = ab["A"].shape[0]
        said = _per_module(config, "r", module, 8)
        _check_agreement(adapter_dir, module, rank, said, _peft_targets(config, module))
        pairs[module] = LoraPair(ab["A"], ab["B"], _peft_scale(config, module, rank))
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
    pairs = {}
    for module, ab in _complete(adapter_dir, halves, "a", "b").items():
        rank = ab["a"].shape[1]
        layer = LAYER.fullmatch(module)
        keys = params.get("keys")
        targeted = keys is None or (layer is not None and layer["rest"] in keys)
        _check_agreement(adapter_dir, module, rank, params.get("rank", rank), targeted)
        pairs[module] = LoraPair(ab["a"].T.copy(), ab["b"].T.copy(), float(params["scale"]))
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
    def thinking(self) -> bool:
        """Whether prompts open a think block (the run's ``chat.enable_thinking``)."""
        return bool(self.run_config and self.run_config.chat.enable_thinking)

    def base_repo_id(self) -> str | None:
        """The base model's Hugging Face id where the files tell it: an id as the adapter's
        ``base_model_name_or_path``, or the ``models/ORG/NAME`` folder ``qwen-mlx download``
        made."""
        named = self.adapter.base_model if self.adapter else None
        for candidate in (named, str(self.model_dir)):
            parts = Path(candidate).parts if candidate else ()
            if "models" in parts:  # download's default folder: models/<repo id>
                parts = parts[len(parts) - parts[::-1].index("models") :]
            if len(parts) == 2 and all(_HUB_PART.fullmatch(p) for p in parts):
                return "/".join(parts)
        return None

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
    from qwen_mlx.config_file import load_config

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
