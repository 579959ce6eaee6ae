"""A rough peak-memory estimate for LoRA training, from config.json alone.

Good to a factor of about 1.5: it tells an 8 GB MacBook user before training whether
Qwen2.5-3B at 4-bit with ``max_seq_length`` 1024 fits, not the exact peak. The parts:
frozen base weights at the quantized width, LoRA weights with their gradients and AdamW
state (fp32), activations kept for the backward pass, the fp32 logits of a row (Qwen's
vocabulary is 151,936), and a fixed framework overhead.

:func:`fit` is the one place a run's estimate meets the device's memory, for ``train`` and
``check`` alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_mlx.families import family_of

if TYPE_CHECKING:
    from qwen_mlx.backends.base import DevicePlan
    from qwen_mlx.config import Config, TrainingConfig

GiB = 1024**3

# Bits per weight of a quantized linear layer, scales included (MLX group 64: fp16 scale
# and bias per group; bitsandbytes NF4 with double quantization is close to 4.1).
BITS = {"4bit": 4.5, "8bit": 8.5, "none": 16.0}
FRAMEWORK_OVERHEAD = 0.6 * GiB
LOSS_CHUNK = 1024  # target rows per LM-head chunk in both trainers' loss


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes
    layers: int = 0  # decoder layers, for what recomputing changes
    layer_input: float = 0.0  # bytes a recomputed layer keeps (its input)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def with_recompute(self, recomputed: int) -> Estimate:
        """The estimate when the first ``recomputed`` layers keep only their input and are
        rebuilt in the backward pass (one at a time, so one layer's activations come back)."""
        if not recomputed or not self.layers:
            return self
        per_layer = self.parts["activations"] / self.layers
        kept = recomputed * self.layer_input + (self.layers - recomputed + 1) * per_layer
        return Estimate({**self.parts, "activations": kept}, self.layers, self.layer_input)

    def layers_to_fit(self, budget: float) -> int | None:
        """The fewest recomputed layers that bring the estimate within ``budget`` bytes: 0
        when it fits as it is, None when recomputing every layer is not enough."""
        for recomputed in range(self.layers + 1):
            if self.with_recompute(recomputed).total <= budget:
                return recomputed
        return None

    def describe(self) -> str:
        pieces = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items())
        return f"≈{self.total / GiB:.1f} GiB ({pieces})"


def _dims(config: dict[str, Any]) -> dict[str, int]:
    return {
        "E": config["hidden_size"],
        "L": config["num_hidden_layers"],
        "V": config["vocab_size"],
        "F": config["intermediate_size"],
    }


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder block, as the model's family says."""
    return family_of(config, "the model").linear_shapes(config)


def parameter_count(config: dict[str, Any]) -> int:
    d = _dims(config)
    per_layer = sum(i * o for i, o in linear_shapes(config).values())
    embeddings = d["V"] * d["E"] * (1 if config.get("tie_word_embeddings", True) else 2)
    return d["L"] * per_layer + embeddings


def lora_parameter_count(config: dict[str, Any], rank: int, targets: list[str]) -> int:
    shapes = linear_shapes(config)
    per_layer = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    return _dims(config)["L"] * per_layer


def estimate_training_memory(
    config: dict[str, Any],
    *,
    quantization: str,
    rank: int,
    targets: list[str],
    max_seq_length: int,
    batch_size: int,
    fp32: bool = False,
) -> Estimate:
    """Peak bytes for LoRA training of the model described by ``config`` (config.json)."""
    d = _dims(config)
    linear = d["L"] * sum(i * o for i, o in linear_shapes(config).values())
    embeddings = parameter_count(config) - linear
    act_bytes = 4 if fp32 else 2  # fp32 is the torch CPU path: weights and activations
    weight_bits = 32.0 if fp32 and quantization == "none" else BITS[quantization]
    tokens = max_seq_length * batch_size
    # Per token and layer, the backward pass keeps the inputs of the norms, attention and MLP
    # projections without checkpointing: about 12 hidden-size vectors, 4 as wide as the
    # queries (hidden size for Qwen2; Qwen3's head_dim can make them wider) and 6
    # intermediate-size ones.
    queries = linear_shapes(config)["q_proj"][1]
    activations = tokens * d["L"] * (12 * d["E"] + 4 * queries + 6 * d["F"]) * act_bytes
    return Estimate(
        layers=d["L"],
        layer_input=tokens * d["E"] * act_bytes,
        parts={
            "base weights": (linear * weight_bits + embeddings * act_bytes * 8) / 8,
            "LoRA + optimizer": lora_parameter_count(config, rank, targets) * 16,
            "activations": activations,
            # fp32 logits and their gradient: both trainers compute the loss in chunks of
            # LOSS_CHUNK target rows, so never more than one chunk's worth.
            "logits": min(tokens, LOSS_CHUNK) * d["V"] * 4 * 2,
            "overhead": FRAMEWORK_OVERHEAD,
        },
    )


def system_memory() -> int | None:
    """Physical memory of this machine in bytes (unified memory on Apple Silicon)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fit_recompute(training: TrainingConfig, estimate: Estimate, available: float) -> str | None:
    """Turn on (selective) gradient checkpointing in ``training`` (changed in place) when
    the run would not fit in 90% of ``available`` bytes without it; return a note saying so,
    or None. Recomputing only as many layers as needed costs the least time.
    """
    if training.gradient_checkpointing or estimate.total <= 0.9 * available:
        return None
    recomputed = estimate.layers_to_fit(0.9 * available)
    if not recomputed:  # None: even every layer is not enough; say so elsewhere
        return None
    training.gradient_checkpointing = True
    training.checkpoint_fraction = recomputed / estimate.layers
    return (
        f"training memory ≈{estimate.total / GiB:.1f} GiB would not fit in "
        f"{available / GiB:.0f} GiB: recomputing {recomputed} of {estimate.layers} layers' "
        f"activations (≈{estimate.with_recompute(recomputed).total / GiB:.1f} GiB); "
        "set training.gradient_checkpointing: true to choose yourself"
    )


@dataclass
class Fit:
    """The memory verdict of a planned run: the estimate as it will run (after any
    recomputation was switched on), the memory it has, and what to tell the user."""

    estimate: Estimate
    available: float | None
    recomputed: int = 0  # decoder layers that recompute their activations
    recompute_added: bool = False  # fit switched recomputation on to make the run fit
    notes: list[str] = field(default_factory=list)

    @property
    def tight(self) -> bool:
        """Near the limit: freed buffers should go back to the system, not to a cache."""
        return self.available is not None and self.estimate.total >= 0.6 * self.available


def estimate_run(cfg: Config, plan: DevicePlan) -> Estimate:
    """The peak-memory estimate of training ``cfg`` as ``plan`` runs it."""
    from qwen_mlx.config import row_length
    from qwen_mlx.model_files import read_model_config

    t = cfg.training
    return estimate_training_memory(
        read_model_config(Path(cfg.model.path)),
        quantization=plan.quantization,
        rank=cfg.lora.rank,
        targets=list(cfg.lora.target_modules),
        # Every layout (training.packing) batches at most batch_size rows of row_length
        # tokens: packed rows are that long, unpacked and bucketed ones (a sample or pair
        # each) at most, so the longest samples set the peak.
        # Preference rows hold whole pairs (2 × max_seq_length); a DPO/ORPO step of a row
        # costs what an SFT step of it does (bench/preference.py), the reference pass having
        # run before training without gradients.
        max_seq_length=row_length(t),
        batch_size=t.batch_size,
        fp32=plan.fp32,
    )


def fit(cfg: Config, plan: DevicePlan) -> Fit:
    """Fit the run into ``plan.device_memory``: recompute as few layers as make it fit
    (``cfg.training`` is changed in place, before the trainer is built), and say plainly
    when it is tight or will not fit. ``train`` and ``check`` both go through here."""
    from qwen_mlx.config import recomputed_layers

    estimate = estimate_run(cfg, plan)
    available = plan.device_memory
    note = fit_recompute(cfg.training, estimate, available) if available else None
    recomputed = recomputed_layers(cfg.training, estimate.layers)
    estimate = estimate.with_recompute(recomputed)
    result = Fit(estimate, available, recomputed, note is not None, [note] if note else [])
    if result.tight:
        verdict = "will not fit" if estimate.total > 0.9 * available else "is tight"
        result.notes.append(
            f"training memory {verdict}: estimated {estimate.describe()} of "
            f"{available / GiB:.0f} GiB. To use less: {'; '.join(_savings(cfg))}"
        )
    return result


def _savings(cfg: Config) -> list[str]:
    t = cfg.training
    tips = {
        "training.gradient_checkpointing: true": not t.gradient_checkpointing,
        f"training.max_seq_length: {max(16, t.max_seq_length // 2)}": t.max_seq_length > 512,
        "training.batch_size: 1 (raise gradient_accumulation_steps)": t.batch_size > 1,
        "model.quantization: 4bit": cfg.model.quantization != "4bit",
        "lora.rank: 8": cfg.lora.rank > 8,
    }
    return [tip for tip, useful in tips.items() if useful] + ["a smaller model (Qwen2.5-1.5B)"]
