"""PyTorch model side of the torch backend: load the base, add LoRA, compute the loss.

Loading: bf16 on CUDA (NF4 4-bit with double quantization, or int8, through bitsandbytes
for QLoRA), fp32 on CPU and MPS. bitsandbytes also has a CPU path, so 4-bit works without a
GPU where it is installed; where it is not, the base loads unquantized and we say so.

Loss: only assistant tokens are targets, so the LM head runs only on the hidden states that
predict a target, in chunks, each chunk recomputed in the backward pass. The fp32 logits of a
whole row (rows × 151,936 for Qwen) never exist at once. With Liger Kernel (CUDA), its fused
linear + cross-entropy does the same job in Triton, and its RMSNorm, SwiGLU and RoPE kernels
replace transformers' eager ones. Preference objectives (DPO, ORPO) need each sample's
summed answer log-prob instead: the same chunks give per-token log-probs, summed per sample
(Liger's fused loss only gives the total, so those runs use the chunks).

Attention: SDPA with the block-diagonal mask transformers builds from packed position ids, or
FlexAttention (CUDA), which gets the same mask as a block mask and skips the blocks that lie
wholly between samples. Selective checkpointing recomputes only the first layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen_mlx import memory
from qwen_mlx.config import Config, recomputed_layers

# Target rows per LM-head chunk: 1024 × 151,936 fp32 logits ≈ 0.6 GB (the memory estimate
# counts on it).
LOSS_CHUNK = memory.LOSS_CHUNK


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken bitsandbytes install must not stop unquantized training
        return False
    return True


def quantization_plan(quantization: str, device: torch.device) -> tuple[str, str | None]:
    """The quantization that will really be used here, and a note when it differs."""
    if quantization == "none":
        return "none", None
    if device.type == "mps":
        return (
            "none",
            f"model.quantization {quantization} needs bitsandbytes, which has no MPS support; "
            "training the unquantized base (use the mlx backend on a Mac for QLoRA)",
        )
    if not _bnb_available():
        return (
            "none",
            f"model.quantization {quantization} needs bitsandbytes (pip install 'qwen-mlx[cuda]'); "
            "training the unquantized base",
        )
    return quantization, None


def attention_plan(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The attention implementation transformers will use, and a note when it differs."""
    if requested == "flex" and device.type != "cuda":
        # PyTorch has no FlexAttention backward pass on CPU or MPS.
        return "sdpa", "training.attention: flex needs CUDA; using sdpa"
    return ("flex_attention" if requested == "flex" else "sdpa"), None


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # a broken install (e.g. a Triton mismatch) must not stop training
        return False
    return True


def kernel_plan(requested: str, device: torch.device) -> tuple[bool, str | None]:
    """Whether Liger Kernel's fused kernels will be used, and a note when asked for in vain.

    ``auto`` means none for now: this path has not yet run on a GPU with PEFT, bitsandbytes
    and packed rows together (bench/gpu_h100.sh measures it), so it stays opt-in.
    """
    if requested != "liger":
        return False, None
    if device.type != "cuda":
        return False, "training.kernels: liger needs CUDA (Triton); using PyTorch's kernels"
    if not _liger_available():
        return False, "training.kernels: liger needs liger-kernel (pip install liger-kernel)"
    return True, None


def _quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(
    model_dir: str | Path, quantization: str, device: torch.device, attention: str = "sdpa"
) -> nn.Module:
    """The frozen base model, ready for LoRA (``quantization`` and ``attention``, as
    transformers names it, already resolved)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" or quantization != "none" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if quantization != "none":
        kwargs["quantization_config"] = _quantization_config(quantization, dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(Path(model_dir).resolve()), **kwargs)
    if quantization == "none":
        model.to(device)
    model.config.use_cache = False
    if quantization != "none" and device.type == "cpu":
        _keep_cpu_4bit_trainable(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _keep_cpu_4bit_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during validation.

    Its first no-grad forward in eval mode converts the weights to an inference-only layout
    whose matmul breaks autograd, so the next training step would fail.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_liger(model: nn.Module) -> None:
    """Liger Kernel's RMSNorm, SwiGLU and RoPE in place of transformers' (before LoRA: its
    SwiGLU calls the gate/up/down projections as modules, so PEFT's wrappers still run). The
    loss is TokenLoss's, switched to Liger's fused linear + cross-entropy. Liger patches
    each architecture by its own function: the model's ``model_type`` (qwen2, qwen3) names it."""
    import liger_kernel.transformers as liger

    getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}")(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )


def add_lora(model: nn.Module, cfg: Config) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA; the init is seeded so runs are reproducible."""
    from peft import LoraConfig, get_peft_model

    layers = model.model.layers
    recomputed = recomputed_layers(cfg.training, len(layers))
    if recomputed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in layers[recomputed:]:  # selective: the rest keep their activations
            layer.gradient_checkpointing = False
    torch.manual_seed(cfg.training.seed)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, lora)


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def _chunk_logps(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return -F.cross_entropy(logits, labels, reduction="none")


def _chunked(fn, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> list:
    """``fn`` over LOSS_CHUNK targets at a time, each chunk recomputed in the backward pass
    (one chunk alone is not: recomputing it would only cost time)."""
    if labels.numel() <= LOSS_CHUNK:
        return [fn(hidden, labels, weight)]
    return [
        checkpoint(
            fn,
            hidden[at : at + LOSS_CHUNK],
            labels[at : at + LOSS_CHUNK],
            weight,
            use_reentrant=False,
        )
        for at in range(0, labels.numel(), LOSS_CHUNK)
    ]


class TokenLoss(nn.Module):
    """Summed cross-entropy over target tokens; the module DDP wraps."""

    def __init__(self, peft_model: nn.Module, fused_cross_entropy: bool = False):
        super().__init__()
        self.peft_model = peft_model
        self.fused = None
        if fused_cross_entropy:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        sample_of_target: torch.Tensor | None = None,
        samples: int = 0,
    ) -> torch.Tensor:
        """The summed target loss; with ``sample_of_target`` (the sample each target token
        belongs to, in row-major order), each of the ``samples`` samples' summed log-prob."""
        causal_lm = self.peft_model.get_base_model()
        # No attention mask and no cache: transformers then builds a block-diagonal causal
        # mask from the position ids that restart at 0 for every packed sample.
        hidden = causal_lm.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = loss_mask[:, 1:].bool()
        hidden = hidden[:, :-1][targets]
        labels = input_ids[:, 1:][targets]
        weight = causal_lm.get_output_embeddings().weight
        if sample_of_target is not None:
            logps = torch.cat(_chunked(_chunk_logps, hidden, labels, weight))
            return logps.new_zeros(samples).index_add(0, sample_of_target, logps)
        if self.fused is not None:
            return self.fused(weight, hidden, labels).float()
        chunks = _chunked(_chunk_loss, hidden, labels, weight)
        if len(chunks) == 1:
            return chunks[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        for chunk in chunks:
            total = total + chunk
        return total


def load_lora_weights(peft_model: nn.Module, adapter_dir: Path) -> None:
    """Set the model's LoRA layers from a trained adapter (PEFT or mlx-lm format), exactly;
    ``training.from_adapter``. Its rank and targets must be the run's (training_run sees to
    that)."""
    from qwen_mlx.adapters import load_adapter
    from qwen_mlx.errors import UserError

    modules = dict(peft_model.get_base_model().named_modules())
    for name, pair in load_adapter(Path(adapter_dir)).pairs.items():
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "lora_A"):
            raise UserError(f"{adapter_dir}: {name} has no LoRA layer in this run's model")
        with torch.no_grad():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.from_numpy(pair.a).to(a.dtype))
            # PEFT scales by lora_alpha / r; fold any other scale of the adapter into B.
            scale = layer.scaling["default"]
            b.copy_(torch.from_numpy(pair.b * (pair.scale / scale)).to(b.dtype))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024**3
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)
