"""Qwen3 dense models (``Qwen3ForCausalLM``): shapes, tokens and chat-template facts.

Against Qwen2, a decoder block has no q/k/v biases, an RMSNorm over each query and key head
(``q_norm``, ``k_norm``, of ``head_dim``), and ``head_dim`` is given in config.json rather than
hidden/heads (Qwen3-0.6B: 1024 hidden, 16 heads of 128). 0.6B–4B tie the output matrix to the
embeddings, 8B does not. The tokenizer and split pattern are Qwen2's; ``<think>`` and
``</think>`` are added tokens that the template writes as text. The chat template opens a
think block in the last assistant turn: empty when thinking is off (``enable_thinking=False``),
and it drops the reasoning of turns before the last question.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwen_mlx.families import qwen2
from qwen_mlx.families.base import Shapes, TinyFacts

THINK_TAGS = ("<think>", "</think>")
EMPTY_THINK = f"{THINK_TAGS[0]}\n\n{THINK_TAGS[1]}\n\n"  # enable_thinking=False's reply opening


def head_dim(config: dict[str, Any]) -> int:
    """Width of one attention head: config.json's ``head_dim``, else hidden/heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder block (Qwen2's, with Qwen3's head_dim)."""
    return qwen2.linear_shapes({**config, "head_dim": head_dim(config)})


def tensor_shapes(config: dict[str, Any]) -> Shapes:
    """Every tensor of a Qwen3ForCausalLM checkpoint: Qwen2's without the q/k/v biases, with
    the per-head q/k norms after ``o_proj``; no ``lm_head`` when the embeddings are tied."""
    width = head_dim(config)
    shapes: Shapes = {}
    for name, shape in qwen2.tensor_shapes({**config, "head_dim": width}).items():
        if name.endswith(".bias"):
            continue
        shapes[name] = shape
        if name.endswith("self_attn.o_proj.weight"):
            prefix = name.removesuffix("o_proj.weight")
            shapes[prefix + "q_norm.weight"] = (width,)
            shapes[prefix + "k_norm.weight"] = (width,)
    return shapes


# Qwen3 keeps Qwen2's tokenizer, split pattern, ChatML tokens and GGUF tokenizer keys.
QWEN3 = dataclasses.replace(
    qwen2.QWEN2,
    name="qwen3",
    description="Qwen3 dense models (model_type qwen3, Qwen3ForCausalLM: 0.6B to 32B, 2507)",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    linear_shapes=linear_shapes,
    tensor_shapes=tensor_shapes,
    gguf_arch="QWEN3",
    default_system_prompt="",  # Qwen3's template adds no system turn of its own
    chat_template_file="qwen3_chat_template.jinja",
    ollama_template_file="qwen3_ollama.gotmpl",
    think_tags=THINK_TAGS,
    empty_think=EMPTY_THINK,
    text_tokens=THINK_TAGS,
    tiny=TinyFacts(
        transformers_version="4.51.0",
        config={
            "attention_bias": False,
            "max_position_embeddings": 40960,
            "rope_scaling": None,
            "sliding_window": None,
        },
        sampling={"temperature": 0.6, "top_p": 0.95, "top_k": 20},  # as Qwen3 recommends
        head_dim_factor=2,
    ),
)
