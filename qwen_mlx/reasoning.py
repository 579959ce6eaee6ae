"""A reply's think block apart from its answer (Qwen3 with ``chat.enable_thinking`` on).

The reply opens with the family's think tag (Qwen3: ``<think>``), reasons, closes it
(``</think>``) and answers; ``serve`` returns the block as OpenAI's ``reasoning_content`` and
``eval`` scores only the answer. A family without think tags (Qwen2) answers only.
"""

from __future__ import annotations

NO_TAGS = ("", "")


class ReasoningSplit:
    """A reply's text, fed piece by piece, as ``(field, text)`` deltas: the think block the
    reply opens with goes to ``reasoning_content`` (without the tags and the newlines the
    template puts around them), everything else to ``content``. Only what may still be the
    start of a tag is held back."""

    def __init__(self, tags: tuple[str, str] | None) -> None:
        self.opening, self.closing = tags or NO_TAGS
        self.buffer = ""
        self.field: str | None = None  # None until the reply shows whether it opens a block
        self.thought = False  # whether it did
        self.trim = False  # newlines after a tag are the template's

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        if self.field is None:
            head = self.buffer.lstrip()
            if self.opening and self.opening.startswith(head):  # may still become the tag
                return []
            self.field = "content"
            if self.opening and head.startswith(self.opening):
                self.field, self.thought, self.trim = "reasoning_content", True, True
                self.buffer = head[len(self.opening) :]
        if self.trim:
            self.buffer = self.buffer.lstrip("\n")
            self.trim = not self.buffer
        if self.field == "content":
            text, self.buffer = self.buffer, ""
            return [("content", text)] if text else []
        return self._reasoning()

    def _reasoning(self) -> list[tuple[str, str]]:
        at = self.buffer.find(self.closing)
        if at >= 0:
            thought = self.buffer[:at].rstrip("\n")
            self.buffer, self.field, self.trim = (
                self.buffer[at + len(self.closing) :],
                "content",
                True,
            )
            return [("reasoning_content", thought)] * bool(thought) + self.feed("")
        cut = len(self.buffer)
        for k in range(len(self.closing) - 1, 0, -1):  # a tag cut in half by the stream
            if self.buffer.endswith(self.closing[:k]):
                cut -= k
                break
        cut = len(self.buffer[:cut].rstrip("\n"))  # newlines before the tag are the template's
        text, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return [("reasoning_content", text)] if text else []

    def finish(self) -> list[tuple[str, str]]:
        """What is still held back, when the reply has ended."""
        text, self.buffer = self.buffer, ""
        return [(self.field or "content", text)] if text else []


def split_reply(text: str, tags: tuple[str, str] | None) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply; reasoning is None when it opens no think block
    (``tags``: the family's think tags, None when it has none)."""
    split = ReasoningSplit(tags)
    parts = split.feed(text) + split.finish()
    answer = "".join(t for f, t in parts if f == "content")
    reasoning = "".join(t for f, t in parts if f != "content")
    return (reasoning if split.thought else None), answer
