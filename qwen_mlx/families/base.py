"""The ``Family`` type: everything qwen-mlx needs to know about one model architecture.

A family is data plus two shape functions; code elsewhere asks it instead of naming Qwen2.
Adding a family (Qwen3) means writing one module that builds a ``Family`` and listing it in
the registry (``qwen_mlx.families``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Family:
    """What is true of every model of one architecture."""

    name: str  # "qwen2"
    description: str  # for error messages: which models this family covers
    model_types: tuple[str, ...]  # config.json "model_type" values
    architectures: tuple[str, ...]  # config.json "architectures" (the class transformers loads)
    # (in, out) of each linear layer of one decoder block, from config.json.
    linear_shapes: Callable[[dict[str, Any]], dict[str, tuple[int, int]]]
    # Every tensor of the model (Hugging Face names, numpy shapes) in a fixed order.
    tensor_shapes: Callable[[dict[str, Any]], Shapes]
    gguf_arch: str  # gguf.MODEL_ARCH member, also the prefix of the GGUF's own keys
    gguf_tokenizer: str  # tokenizer.ggml.model
    gguf_pre: str  # tokenizer.ggml.pre: how llama.cpp splits text before BPE
    split_pattern: str  # the tokenizer.json pre-tokenizer regex that gguf_pre stands for
    document_end: str  # separates plain-text documents (and pads)
    turn_start: str  # opens a chat turn
    turn_end: str  # closes a chat turn: the token a reply ends with
    default_system_prompt: str  # what the chat template inserts when there is no system turn
    chat_template_file: str  # the family's Jinja chat template, in qwen_mlx/templates
    ollama_template: str  # the same template in ollama's Go template language
    # Added tokens that are ordinary text, not control tokens (Qwen3's <think> and </think>):
    # one id each, but a chat template writes them as text, so message text may spell them.
    text_tokens: tuple[str, ...] = ()
    # Whether the template opens a think block (Qwen3): chat.enable_thinking applies to it.
    thinks: bool = False
    # ollama's template for a model of such a family tuned to reason (chat.enable_thinking).
    ollama_thinking_template: str = ""

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The added control tokens, in the order their ids follow the BPE vocabulary."""
        return (self.document_end, self.turn_start, self.turn_end)

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """Tokens that end a reply: the end of the turn, and the end of the document."""
        return (self.turn_end, self.document_end)

    def chat_template(self) -> str:
        """The family's chat template (Jinja source)."""
        folder = resources.files("qwen_mlx").joinpath("templates")
        return folder.joinpath(self.chat_template_file).read_text("utf-8")

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether config.json describes a model of this family."""
        archs = config.get("architectures") or []
        named = not archs or archs[0] in self.architectures
        return config.get("model_type") in self.model_types and named
