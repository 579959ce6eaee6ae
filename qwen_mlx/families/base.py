"""The ``Family`` type: everything qwen-mlx needs to know about one model architecture.

A family is data plus a few functions (shapes, an export transform); code elsewhere asks it
instead of naming Qwen2. Adding a family (Qwen3) means writing one module that builds a
``Family`` and listing it in the registry (``qwen_mlx.families``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is not imported to list the families (the CLI starts without it)
    import numpy as np

Shapes = dict[str, tuple[int, ...]]
# (Hugging Face tensor name, config.json) -> a function applied to that tensor's values before
# they are written to a GGUF, or None to write them as they are. The function gets an array
# whose first axis is the tensor's output rows (a weight, a bias, or a LoRA B) and returns
# one of the same shape: the seam llama.cpp's converter uses to permute q/k rows for models
# whose rotary layout differs from GGML's. Qwen needs none.
TensorTransform = Callable[[str, dict[str, Any]], "Callable[[np.ndarray], np.ndarray] | None"]


def no_transform(name: str, config: dict[str, Any]) -> None:
    """Qwen's tensors go into a GGUF as they are."""
    return None


# The line of a thinking family's ollama template that says how replies open; the export sets
# it to true for a run tuned to reason.
OLLAMA_TUNED_TO_THINK = "{{- $tunedToThink := false }}"


def _template_path(name: str) -> Path:
    """A template file: one shipped in qwen_mlx/templates, or an absolute path."""
    if Path(name).is_absolute():
        return Path(name)
    return Path(str(resources.files("qwen_mlx").joinpath("templates").joinpath(name)))


@dataclass(frozen=True)
class TinyFacts:
    """What the offline tiny model of a family writes beyond the shapes (``tiny-model``)."""

    transformers_version: str  # the version the family's smallest model was saved with
    config: dict[str, Any] = field(default_factory=dict)  # its own config.json keys
    sampling: dict[str, Any] = field(default_factory=dict)  # generation_config.json sampling
    # head_dim as a multiple of hidden/heads (Qwen3: 2, so code that assumes it is caught);
    # 0 leaves head_dim out of config.json.
    head_dim_factor: int = 0


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
    # The family's Jinja chat template: a file in qwen_mlx/templates, or an absolute path.
    chat_template_file: str
    # The same template in ollama's Go template language (the Modelfile's TEMPLATE): a file in
    # qwen_mlx/templates, or an absolute path. A family with think tags declares there
    # ``OLLAMA_TUNED_TO_THINK`` (false), which the export sets for a run tuned to reason.
    ollama_template_file: str
    tiny: TinyFacts  # the offline tiny model's tables
    # (open, close) of the think block its chat template writes (Qwen3: <think>, </think>);
    # None when it writes none. chat.enable_thinking applies to a family that has them.
    think_tags: tuple[str, str] | None = None
    # What the template puts before a reply when thinking is off (Qwen3: an empty block).
    empty_think: str = ""
    # Added tokens that are ordinary text, not control tokens (Qwen3's think tags): one id
    # each, but a chat template writes them as text, so message text may spell them.
    text_tokens: tuple[str, ...] = ()
    # Whether a prompt starts with a BOS token (tokenizer.ggml.add_bos_token); Qwen's do not.
    adds_bos: bool = False
    gguf_transform: TensorTransform = no_transform

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The added control tokens, in the order their ids follow the BPE vocabulary."""
        return (self.document_end, self.turn_start, self.turn_end)

    @property
    def thinks(self) -> bool:
        """Whether the template opens a think block: chat.enable_thinking applies."""
        return self.think_tags is not None

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """Tokens that end a reply: the end of the turn, and the end of the document."""
        return (self.turn_end, self.document_end)

    def chat_template_path(self) -> Path:
        """Where the family's chat template (Jinja source) is."""
        return _template_path(self.chat_template_file)

    def chat_template(self) -> str:
        """The family's chat template (Jinja source)."""
        return self.chat_template_path().read_text("utf-8")

    def ollama_template(self, thinking: bool = False) -> str:
        """The family's ollama template; ``thinking``: for a model tuned to reason
        (chat.enable_thinking), whose replies open its own think block."""
        text = _template_path(self.ollama_template_file).read_text("utf-8").rstrip("\n")
        if not (thinking and self.thinks):
            return text
        if OLLAMA_TUNED_TO_THINK not in text:
            raise ValueError(f"{self.ollama_template_file} lacks {OLLAMA_TUNED_TO_THINK}")
        return text.replace(OLLAMA_TUNED_TO_THINK, OLLAMA_TUNED_TO_THINK.replace("false", "true"))

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether config.json describes a model of this family."""
        archs = config.get("architectures") or []
        named = not archs or archs[0] in self.architectures
        return config.get("model_type") in self.model_types and named
