"""Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``): shapes, GGUF keys, tokenizer and ChatML facts.

Decoder blocks have biases on q/k/v and none elsewhere; 0.5B–3B tie the output matrix to
the embeddings. The tokenizer is a byte-level BPE whose added tokens follow the merged ones
in the order of ``Family.special_tokens``; conversations are ChatML.
"""

from __future__ import annotations

from typing import Any

from qwen_mlx.families.base import Family, Shapes, TinyFacts

# The pre-tokenizer split of Qwen2's tokenizer.json; llama.cpp's "qwen2" pre-tokenizer is it.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _widths(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(hidden, intermediate, query width, key/value width) of a decoder block."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return hidden, config["intermediate_size"], heads * head_dim, kv_heads * head_dim


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder block."""
    e, f, q, kv = _widths(config)
    return {
        "q_proj": (e, q),
        "k_proj": (e, kv),
        "v_proj": (e, kv),
        "o_proj": (q, e),
        "gate_proj": (e, f),
        "up_proj": (e, f),
        "down_proj": (f, e),
    }


def tensor_shapes(config: dict[str, Any]) -> Shapes:
    """Every tensor of a Qwen2ForCausalLM checkpoint, in module order (no ``lm_head`` when
    the embeddings are tied)."""
    e, f, q, kv = _widths(config)
    shapes: Shapes = {"model.embed_tokens.weight": (config["vocab_size"], e)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (e,)
        for name, out_dim in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (out_dim, e)
            shapes[p + f"self_attn.{name}.bias"] = (out_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (e, q)
        shapes[p + "post_attention_layernorm.weight"] = (e,)
        shapes[p + "mlp.gate_proj.weight"] = (f, e)
        shapes[p + "mlp.up_proj.weight"] = (f, e)
        shapes[p + "mlp.down_proj.weight"] = (e, f)
    shapes["model.norm.weight"] = (e,)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (config["vocab_size"], e)
    return shapes


QWEN2 = Family(
    name="qwen2",
    description="Qwen2 and Qwen2.5 models (model_type qwen2, Qwen2ForCausalLM)",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    linear_shapes=linear_shapes,
    tensor_shapes=tensor_shapes,
    gguf_arch="QWEN2",
    gguf_tokenizer="gpt2",
    gguf_pre="qwen2",
    split_pattern=SPLIT_PATTERN,
    document_end="<|endoftext|>",
    turn_start="<|im_start|>",
    turn_end="<|im_end|>",
    default_system_prompt=DEFAULT_SYSTEM_PROMPT,
    chat_template_file="qwen2_5_chat_template.jinja",
    ollama_template_file="qwen2_5_ollama.gotmpl",
    tiny=TinyFacts(
        transformers_version="4.43.1",
        config={"max_position_embeddings": 32768, "sliding_window": 32768},
        # generation_config.json sampling, as Qwen2.5-Instruct recommends.
        sampling={"repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
    ),
)
