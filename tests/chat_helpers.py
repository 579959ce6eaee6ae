"""A Qwen chat turn and token ids as the tests compare them (a helper module, not a test module)."""

from __future__ import annotations

QUESTION = {"role": "user", "content": "住宿费标准是多少？"}
ANSWER = {"role": "assistant", "content": "每人每天不超过500元。"}


def text_ids(tokenizer, text: str) -> list[int]:
    """``text``'s token ids, with nothing added around them."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
