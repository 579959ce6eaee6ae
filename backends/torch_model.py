"""PyTorch model side of the torch backend: load the base, add LoRA, compute the loss.

Loading: bf16 on CUDA (NF4 4-bit with double quantization, or int8, through bitsandbytes
for QLoRA), fp32 on CPU and MPS. bitsandbytes also has a CPU path, so 4-bit works without a
GPU where it is installed; where it is not, the base loads unquantized and we say so.

Loss: only assistant tokens are targets, so the LM head runs only on the hidden states that
predict a target, in chunks, each chunk recomputed in the backward pass. The fp32 logits of a
whole row (rows × 151,936 for Qwen) never exist at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen_mlx.config import Config

LOSS_CHUNK = 1024  # target rows per LM-head chunk: 1024 × 151,936 fp32 logits ≈ 0.6 GB


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
            f"{quantization} needs bitsandbytes, which has no MPS support; "
            "training the unquantized base (use the mlx backend on a Mac for QLoRA)",
        )
    if not _bnb_available():
        return (
            "none",
            f"{quantization} needs bitsandbytes (pip install 'qwen-mlx[cuda]'); "
            "training the unquantized base",
        )
    return quantization, None


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


def load_base(model_dir: str | Path, quantization: str, device: torch.device) -> nn.Module:
    """The frozen base model, ready for LoRA (``quantization`` already resolved)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" or quantization != "none" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
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


def add_lora(model: nn.Module, cfg: Config, gradient_checkpointing: bool) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA; the init is seeded so runs are reproducible."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


class TokenLoss(nn.Module):
    """Summed cross-entropy over target tokens; the module DDP wraps."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
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
        if labels.numel() <= LOSS_CHUNK:  # one chunk: recomputing it would only cost time
            return _chunk_loss(hidden, labels, weight)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, labels.numel(), LOSS_CHUNK):
            end = start + LOSS_CHUNK
            total = total + checkpoint(
                _chunk_loss, hidden[start:end], labels[start:end], weight, use_reentrant=False
            )
        return total


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024**3
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)
