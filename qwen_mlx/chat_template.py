"""A conversation through its chat template, with message text kept apart from control tokens.

A chat template writes control tokens (``<|im_start|>``, ``<|im_end|>``) around each message.
Tokenizing the rendered string in one go would also turn a control-token string that someone
typed into a message into the real control token, so a user could forge a system turn. So the
template is rendered with an unguessable marker in place of each message's text; its own text is
split at its control tokens, and each run between two control tokens (template text and message
text together) is encoded with control-token strings read as plain characters. Tokenizers
(transformers and llama.cpp alike) split on control tokens before anything else, so for
ordinary text the ids are exactly those of the whole string. Tool-call names and arguments and
the tools' JSON (function calling) are kept apart the same way.

Qwen3's template reshapes assistant turns: it writes ``reasoning_content`` (or a ``<think>``
block at the start of the content) inside ``<think>…</think>``, trims newlines around the
reasoning and before the answer, and drops the reasoning of turns before the last question.
:func:`think_normalized` applies the same splitting and trimming first, so the text the
template receives is the text it writes and stays apart from control tokens.

Training, eval, chat and serve all encode conversations here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from qwen_mlx.errors import UserError
from qwen_mlx.families import Family, tokenizer_family

# Characters per token that text practically never exceeds on average; it only bounds how much
# of an overlong prompt is tokenized before it is refused.
CHARS_PER_TOKEN = 8
CUT_MARGIN = 16  # tokens a cut through the last word may add


@dataclass(frozen=True)
class Piece:
    """A control token of the template, or a run of plain text."""

    text: str
    control: bool = False


class PromptTooLong(UserError):
    """The conversation does not fit in the model's context beside the reply."""

    def __init__(self, tokens: int | None, room: int):
        self.tokens, self.room = tokens, room
        size = tokens if tokens is not None else f"more than {room}"
        super().__init__(
            f"the prompt is {size} tokens; only {room} fit in the model's context beside "
            "max_tokens: shorten the conversation or lower max_tokens"
        )


@lru_cache(maxsize=8)
def _control_pattern(controls: tuple[str, ...]) -> re.Pattern | None:
    if not controls:
        return None
    longest_first = sorted(controls, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")


def _add(pieces: list[Piece], text: str, control: bool = False) -> None:
    if not text:
        return
    if not control and pieces and not pieces[-1].control:
        pieces[-1] = Piece(pieces[-1].text + text)
    else:
        pieces.append(Piece(text, control))


def _add_template(pieces: list[Piece], text: str, pattern: re.Pattern | None) -> None:
    parts = pattern.split(text) if pattern else [text]
    for i, part in enumerate(parts):  # a capturing split: odd parts are the control tokens
        _add(pieces, part, control=i % 2 == 1)


class _Marks:
    """Stand-ins rendered in place of what people wrote, each with the text it stands for."""

    def __init__(self) -> None:
        self.nonce = uuid.uuid4().hex
        self.texts: dict[str, str] = {}

    def text(self, value: str) -> str:
        mark = f"\x00{self.nonce}:{len(self.texts)}\x00"
        self.texts[mark] = value
        return mark

    def json(self, value: Any) -> dict:
        """For what the template writes with ``tojson`` (tools, tool-call arguments): the
        stand-in is an object (transformers accepts only objects as tools), so the render
        holds its JSON where the JSON of ``value`` goes."""
        mark = {self.nonce: len(self.texts)}
        self.texts[json.dumps(mark)] = json.dumps(value, ensure_ascii=False)
        return mark

    def pattern(self) -> re.Pattern:
        """Every stand-in, in one short pattern: an alternation of thousands of them took
        seconds to compile (a conversation of 55,000 messages: 18 s)."""
        nonce = re.escape(self.nonce)
        return re.compile(f'\\x00{nonce}:\\d+\\x00|\\{{"{nonce}": \\d+\\}}')

    def message(self, message: dict) -> dict:
        out = dict(message)
        for key in ("content", "reasoning_content"):
            text = message.get(key)
            if isinstance(text, str) and text:  # empty text may change what a template writes
                out[key] = self.text(text)
        if message.get("tool_calls"):
            out["tool_calls"] = [self._call(call) for call in message["tool_calls"]]
        return out

    def _call(self, call: dict) -> dict:
        fn = call.get("function", call)
        marked = {**fn, "name": self.text(fn["name"]), "arguments": self.json(fn["arguments"])}
        return {**call, "function": marked} if "function" in call else marked


def renders_reasoning(template: str | None) -> bool:
    """Whether a chat template writes think blocks from ``reasoning_content`` (Qwen3)."""
    return "reasoning_content" in (template or "")


def think_normalized(messages: list[dict], tags: tuple[str, str]) -> list[dict]:
    """Assistant turns as a think-block template (Qwen3) writes them: a think block (``tags``:
    the family's, e.g. ``<think>``, ``</think>``) at the start of the content moved to
    ``reasoning_content``, newlines around the reasoning and before the answer trimmed. The
    template renders the result as it renders the input."""
    return [_think_split(m, *tags) if m.get("role") == "assistant" else m for m in messages]


def for_template(messages: list[dict], family: Family, template: str | None) -> list[dict]:
    """``messages`` as ``template`` reads them: think blocks normalized where it writes them."""
    if family.think_tags is None or not renders_reasoning(template):
        return messages
    return think_normalized(messages, family.think_tags)


def _think_split(message: dict, opening: str, closing: str) -> dict:
    content = message.get("content")
    if not isinstance(content, str):
        return message
    reasoning = message.get("reasoning_content")
    if reasoning is None and closing in content:
        # As the template splits: reasoning before the first closing tag, answer after the last.
        reasoning = content.split(closing)[0].rstrip("\n").split(opening)[-1]
        content = content.split(closing)[-1]
    out = {**message, "content": content.lstrip("\n")}
    if isinstance(reasoning, str):
        out["reasoning_content"] = reasoning.strip("\n")
    return out


def template_pieces(
    render: Callable[..., str],
    messages: list[dict],
    controls: Iterable[str],
    tools: list[dict] | None = None,
) -> list[Piece]:
    """The rendered conversation as control tokens and text runs: message text, tool-call
    names and arguments and the tools' JSON are text. ``render(messages)`` renders a
    conversation; with ``tools`` it is called as ``render(messages, tools)``."""
    marks = _Marks()
    marked = [marks.message(m) for m in messages]
    rendered = render(marked) if tools is None else render(marked, [marks.json(t) for t in tools])
    pattern = _control_pattern(tuple(sorted(set(controls))))
    pieces: list[Piece] = []
    at = 0
    if marks.texts:
        for found in marks.pattern().finditer(rendered):
            _add_template(pieces, rendered[at : found.start()], pattern)
            _add(pieces, marks.texts[found[0]])
            at = found.end()
    _add_template(pieces, rendered[at:], pattern)
    expected = render(messages) if tools is None else render(messages, tools)
    if "".join(p.text for p in pieces) != expected:
        raise UserError(
            "the model's chat template changes message text (or writes it more than once), so "
            "message text cannot be kept apart from control tokens; use Qwen's ChatML template"
        )
    return pieces


def encode_pieces(
    pieces: list[Piece],
    encode_text: Callable[[str], list[int]],
    control_id: Callable[[str], int],
    limit: int | None = None,
) -> list[int]:
    """Token ids of ``pieces``; with ``limit``, refuse more ids (see :class:`PromptTooLong`)
    without tokenizing much more of an overlong text than would fit."""
    ids: list[int] = []
    for piece in pieces:
        if piece.control:
            ids.append(control_id(piece.text))
            continue
        if limit is not None:
            _refuse_early(encode_text, piece.text, limit - len(ids), limit)
        ids += encode_text(piece.text)
    if limit is not None and len(ids) > limit:
        raise PromptTooLong(len(ids), limit)
    return ids


def _refuse_early(encode_text, text: str, budget: int, limit: int) -> None:
    head = text[: CHARS_PER_TOKEN * (max(budget, 0) + CUT_MARGIN)]
    if len(head) < len(text) and len(encode_text(head)) > budget + CUT_MARGIN:
        raise PromptTooLong(None, limit)


def spells_control(texts: Iterable[Any], controls: Iterable[str]) -> bool:
    """Whether any of ``texts`` contains a control-token string (it is encoded as text)."""
    controls = list(controls)
    return any(isinstance(t, str) and any(c in t for c in controls) for t in texts)


# ---------------------------------------------------------------- transformers tokenizers


def hf_controls(tokenizer: Any) -> list[str]:
    """The tokenizer's control tokens: its added tokens marked special."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def hf_text(tokenizer: Any, text: str, offsets: bool = False) -> Any:
    """``text`` encoded as plain text: a control-token string in it becomes ordinary tokens."""
    return tokenizer(
        text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets
    )


def hf_render(
    tokenizer: Any,
    messages: list[dict],
    generation_prompt: bool = False,
    tools: list | None = None,
    thinking: bool = False,
) -> str:
    """The conversation as the tokenizer's chat template writes it. ``thinking`` is the
    template's ``enable_thinking`` (Qwen3: off opens the reply with an empty think block;
    templates without the switch ignore it)."""
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=generation_prompt,
        enable_thinking=thinking,
    )


@dataclass(frozen=True)
class Rendered:
    """A conversation as the tokenizer's template wrote it: the messages as the template read
    them (think blocks normalized), its pieces, and their token ids with the character
    offset at which each token starts."""

    messages: list[dict]
    pieces: list[Piece]
    ids: list[int]
    starts: list[int]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    def control_spans(self) -> list[tuple[int, int]]:
        """The character span of every control token, in order."""
        spans, at = [], 0
        for piece in self.pieces:
            if piece.control:
                spans.append((at, at + len(piece.text)))
            at += len(piece.text)
        return spans


def hf_rendered(tokenizer: Any, messages: list[dict], tools: list | None = None) -> Rendered:
    """The whole conversation through the template, encoded (for training samples)."""
    messages = for_template(messages, tokenizer_family(tokenizer), tokenizer.chat_template)
    pieces = hf_pieces(tokenizer, messages, tools=tools)
    return Rendered(messages, pieces, *hf_encode(tokenizer, pieces))


def hf_pieces(
    tokenizer: Any,
    messages: list[dict],
    generation_prompt: bool = False,
    tools: list[dict] | None = None,
    thinking: bool = False,
) -> list[Piece]:
    def render(conversation: list[dict], tools: list | None = None) -> str:
        return hf_render(tokenizer, conversation, generation_prompt, tools, thinking)

    messages = for_template(messages, tokenizer_family(tokenizer), tokenizer.chat_template)
    return template_pieces(render, messages, hf_controls(tokenizer), tools)


def hf_encode(tokenizer: Any, pieces: list[Piece]) -> tuple[list[int], list[int]]:
    """Ids of ``pieces`` and the character offset at which each token starts."""
    ids: list[int] = []
    starts: list[int] = []
    at = 0
    for piece in pieces:
        if piece.control:
            ids.append(tokenizer.convert_tokens_to_ids(piece.text))
            starts.append(at)
        else:
            enc = hf_text(tokenizer, piece.text, offsets=True)
            ids += enc["input_ids"]
            starts += [at + start for start, _ in enc["offset_mapping"]]
        at += len(piece.text)
    return ids, starts


def hf_prompt_ids(
    tokenizer: Any, messages: list[dict], limit: int | None = None, thinking: bool = False
) -> list[int]:
    """The prompt that asks for the assistant's next turn, at most ``limit`` tokens; with
    ``thinking`` off a Qwen3 reply starts after an empty think block, as it was trained."""
    pieces = hf_pieces(tokenizer, messages, generation_prompt=True, thinking=thinking)
    return encode_pieces(
        pieces,
        lambda text: hf_text(tokenizer, text)["input_ids"],
        tokenizer.convert_tokens_to_ids,
        limit,
    )
