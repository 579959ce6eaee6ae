"""A chat record → token ids + loss mask: the one way a conversation becomes a training sample.

Layers: :mod:`qwen_mlx.chat_template` renders and encodes (control tokens apart from message
text); this module finds the trained turns in what it rendered; :mod:`qwen_mlx.tokens` turns
records into samples, counts what it cost and packs rows.

The loss mask is computed on the rendered text: each assistant turn's span (its content and
tool calls and the closing turn-end token, not the newline after it) starts where the prompt
for that turn (the conversation before it, rendered with the generation prompt) ends, and
ends with the first control token after it; every token whose offset starts inside a span is
a training target. A turn with ``weight: 0`` (OpenAI's fine-tuning format) is context only,
even with ``mask_prompt: false``. This works for any template that renders the conversation
before a turn as a prefix of the whole.

A family with think blocks (Qwen3): a turn with ``reasoning_content`` (the record's
``reasoning``) is trained from the opening think tag on, the reasoning included; a turn
without it is trained in non-thinking form, after the empty think block that
``enable_thinking=False`` puts in the prompt, so training and inference prompts are the same
tokens. Earlier turns are trained as the template renders them in the whole conversation
(without think blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_mlx.chat_template import Rendered, hf_render, hf_rendered
from qwen_mlx.errors import UserError


@dataclass
class Sample:
    """One tokenized record. ``loss_mask[t]`` is 1 where token ``t`` is a training target."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_chat(
    tokenizer: Any, messages: list[dict], mask_prompt: bool = True, tools: list | None = None
) -> Sample:
    """The conversation's ids; targets: its assistant turns (all but the weight-0 turns and
    the first token without ``mask_prompt``)."""
    rendered = hf_rendered(tokenizer, messages, tools)
    if not mask_prompt:
        spans = assistant_spans(tokenizer, rendered, tools, weight=0)
        mask = [int(not _inside(start, spans)) for start in rendered.starts]
        return Sample(rendered.ids, [0, *mask[1:]])
    spans = assistant_spans(tokenizer, rendered, tools)
    return Sample(rendered.ids, [int(_inside(start, spans)) for start in rendered.starts])


def _inside(at: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= at < b for a, b in spans)


def assistant_spans(
    tokenizer: Any, rendered: Rendered, tools: Any = None, weight: int = 1
) -> list[tuple[int, int]]:
    """The character span (text and tool calls up to the closing control token) of every
    assistant turn of ``weight`` in ``rendered``: 1, the trained turns; 0, those marked
    ``weight: 0``. Message text is never a control piece, so the first control token after
    a turn's start closes it."""
    full, closes = rendered.text, rendered.control_spans()
    spans = []
    for i, message in enumerate(rendered.messages):
        if message["role"] != "assistant" or message.get("weight", 1) != weight:
            continue
        start = _turn_start(tokenizer, full, rendered.messages, i, tools)
        end = next((b for a, b in closes if a >= start), len(full.rstrip()))
        spans.append((start, end))
    return spans


def _without_reasoning(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def _turn_start(tokenizer: Any, full: str, messages: list[dict], i: int, tools: Any) -> int:
    """Where assistant turn ``i`` starts being a target in ``full``: after its prompt.

    An empty think block (a turn without reasoning, enable_thinking off) is prompt; where the
    template writes the turn without one (turns before the last question), the prompt ends at
    the role line, and reasoning the template drops there is dropped from the prompt too."""
    thinking = bool(messages[i].get("reasoning_content"))
    before = messages[:i]
    for context in (before, _without_reasoning(before)):
        for think in dict.fromkeys((thinking, True)):
            prefix = hf_render(tokenizer, context, True, tools, think)
            if full.startswith(prefix):
                return len(prefix)
    raise UserError(
        "the chat template does not render a conversation as a prefix of its "
        "continuation, so assistant tokens cannot be located; set data.mask_prompt: false"
    )
