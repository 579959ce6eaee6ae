"""Qwen3's chat template in training and serving: the loss mask token by token against the
template (non-thinking form, reasoning inside the think block, earlier turns and tool calls as
rendered), and the think block of a reply as serve's ``reasoning_content`` and eval's answer.
"""

from __future__ import annotations

import json

import pytest
from chat_helpers import ANSWER, QUESTION, text_ids

from qwen_mlx.families import QWEN2, QWEN3

# ---------------------------------------------------------------- chat template and loss mask


def _targets(tokenizer, sample) -> list[int]:
    return [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]


def test_a_record_without_reasoning_trains_the_answer_after_the_empty_think_block(
    qwen3_tokenizer,
):
    from qwen_mlx.chat_template import hf_prompt_ids
    from qwen_mlx.tokens import encode_chat

    sample = encode_chat(qwen3_tokenizer, [QUESTION, ANSWER])
    # Token by token what the template renders: the non-thinking form.
    rendered = qwen3_tokenizer.apply_chat_template([QUESTION, ANSWER], tokenize=False)
    assert "<think>\n\n</think>\n\n每人" in rendered
    assert sample.input_ids == text_ids(qwen3_tokenizer, rendered.rstrip("\n")) + text_ids(
        qwen3_tokenizer, "\n"
    )
    assert _targets(qwen3_tokenizer, sample) == text_ids(
        qwen3_tokenizer, "每人每天不超过500元。<|im_end|>"
    )
    # The untrained part is exactly the prompt inference sends with thinking off.
    first = sample.loss_mask.index(1)
    assert sample.input_ids[:first] == hf_prompt_ids(qwen3_tokenizer, [QUESTION], thinking=False)


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content", "inline"])
def test_a_records_reasoning_is_trained_inside_the_think_block(qwen3_tokenizer, field):
    from qwen_mlx.chat_template import hf_prompt_ids
    from qwen_mlx.data_formats import normalize
    from qwen_mlx.tokens import encode_chat

    reasoning = "查细则第三条：一般人员500元。"
    if field == "inline":
        answer = {**ANSWER, "content": f"<think>\n{reasoning}\n</think>\n\n{ANSWER['content']}"}
    else:
        answer = {**ANSWER, field: reasoning}
    record, _ = normalize({"messages": [QUESTION, answer]})
    sample = encode_chat(qwen3_tokenizer, record["messages"])
    want = f"<think>\n{reasoning}\n</think>\n\n每人每天不超过500元。<|im_end|>"
    assert _targets(qwen3_tokenizer, sample) == text_ids(qwen3_tokenizer, want)
    first = sample.loss_mask.index(1)
    assert sample.input_ids[:first] == hf_prompt_ids(qwen3_tokenizer, [QUESTION], thinking=True)


def test_earlier_turns_are_trained_as_the_template_renders_them(qwen3_tokenizer):
    from qwen_mlx.tokens import encode_chat

    first = {"role": "assistant", "content": "你好！", "reasoning_content": "打个招呼。"}
    messages = [{"role": "user", "content": "你好"}, first, QUESTION, ANSWER]
    sample = encode_chat(qwen3_tokenizer, messages)
    rendered = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    # Qwen3 drops the reasoning of turns before the last question; so does the sample.
    assert "打个招呼" not in rendered
    assert qwen3_tokenizer.decode(sample.input_ids) == rendered.rstrip("\n") + "\n"
    want = "你好！<|im_end|>" + "每人每天不超过500元。<|im_end|>"
    assert qwen3_tokenizer.decode(_targets(qwen3_tokenizer, sample)) == want


def test_message_text_that_spells_think_or_control_tokens_stays_text(qwen3_tokenizer):
    from qwen_mlx.tokens import encode_chat

    answer = {**ANSWER, "reasoning_content": "x<|im_end|>y", "content": "<|im_start|>z"}
    sample = encode_chat(qwen3_tokenizer, [QUESTION, answer])
    im_start, im_end = qwen3_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # One turn opening for the question, one for the answer; one close each.
    assert sample.input_ids.count(im_start) == 2 and sample.input_ids.count(im_end) == 2


# ---------------------------------------------------------------- serve: reasoning_content

THOUGHT_REPLY = "<think>\n先查细则。\n看第三条。\n</think>\n\n每人每天不超过500元。"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_a_streamed_think_block_splits_as_the_whole_reply_does(size):
    from qwen_mlx.reasoning import ReasoningSplit
    from qwen_mlx.serve.api import reply_message

    whole = reply_message(THOUGHT_REPLY, QWEN3.think_tags)
    assert whole["reasoning_content"] == "先查细则。\n看第三条。"
    assert whole["content"] == "每人每天不超过500元。"
    split = ReasoningSplit(QWEN3.think_tags)
    parts = []
    for at in range(0, len(THOUGHT_REPLY), size):
        parts += split.feed(THOUGHT_REPLY[at : at + size])
    parts += split.finish()
    for field in ("reasoning_content", "content"):
        assert "".join(t for f, t in parts if f == field) == whole[field]
    # A reply without a think block is all content, and says nothing of reasoning.
    assert reply_message(" <thin", QWEN3.think_tags) == {"role": "assistant", "content": " <thin"}
    # A family without think tags (Qwen2) answers only: a <think> it writes is its answer.
    assert reply_message(THOUGHT_REPLY, QWEN2.think_tags)["content"] == THOUGHT_REPLY


def test_serve_returns_the_think_part_as_reasoning_content():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_helpers import http, running
    from web_helpers import ScriptedEngine

    from qwen_mlx.serve.server import Server

    ask = {"model": "scripted", "messages": [QUESTION], "max_tokens": 100}
    with running(Server(ScriptedEngine(THOUGHT_REPLY), None)) as port:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        message = http("POST", url, json.dumps(ask).encode()).json()["choices"][0]["message"]
        streamed = http("POST", url, json.dumps({**ask, "stream": True}).encode()).text
    assert message["reasoning_content"] == "先查细则。\n看第三条。"
    assert message["content"] == "每人每天不超过500元。"
    deltas = [
        json.loads(line[6:])["choices"][0]["delta"]
        for line in streamed.splitlines()
        if line.startswith("data: {") and '"choices": [{' in line
    ]
    for field in ("reasoning_content", "content"):
        assert "".join(d.get(field) or "" for d in deltas) == message[field]


def test_eval_scores_the_answer_not_the_think_block(qwen3_tokenizer):
    from web_helpers import ScriptedEngine

    from qwen_mlx.eval.evaluate import Case, run_model

    engine = ScriptedEngine(THOUGHT_REPLY)
    engine.tokenizer = qwen3_tokenizer
    engine.score = lambda samples: (2.0, 1)
    record = {"messages": [QUESTION, ANSWER]}
    case = Case([QUESTION], ANSWER["content"], record)
    result = run_model(engine, "tuned", [case], max_tokens=64, max_len=256)
    assert result.answers == ["每人每天不超过500元。"]


def test_reasoning_on_a_model_that_cannot_write_it_is_named(tiny_tokenizer, qwen3_tokenizer):
    from qwen_mlx.tokens import encode_records

    records = [{"messages": [QUESTION, {**ANSWER, "reasoning_content": "查第三条。"}]}]
    _, report = encode_records(tiny_tokenizer, records, 256)  # Qwen2.5's ChatML template
    (warning,) = [w for w in report.warnings(256) if "reasoning" in w]
    assert warning.startswith("1 of 1 records carry reasoning") and "not trained" in warning
    _, report = encode_records(qwen3_tokenizer, records, 256)
    assert not [w for w in report.warnings(256) if "reasoning" in w]


def test_tool_call_turns_train_as_rendered_before_and_after_a_later_question(qwen3_tokenizer):
    from qwen_mlx.tokens import encode_chat

    call = {"type": "function", "function": {"name": "get_rule", "arguments": {"id": 3}}}
    params = {"type": "object", "properties": {"id": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "get_rule", "parameters": params}}]
    steps = [
        QUESTION,
        {"role": "assistant", "content": "", "reasoning_content": "要查。", "tool_calls": [call]},
        {"role": "tool", "content": "500元"},
        ANSWER,
    ]
    calling = '<tool_call>\n{"name": "get_rule", "arguments": {"id": 3}}\n</tool_call><|im_end|>'
    answer = "每人每天不超过500元。<|im_end|>"

    def targets(messages):
        sample = encode_chat(qwen3_tokenizer, messages, tools=tools)
        rendered = qwen3_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        assert qwen3_tokenizer.decode(sample.input_ids) == rendered.rstrip("\n") + "\n"
        return qwen3_tokenizer.decode(_targets(qwen3_tokenizer, sample))

    # The steps after the last question keep the call's reasoning; a later question drops it.
    assert targets(steps) == "<think>\n要查。\n</think>\n\n" + calling + answer
    later = [*steps, {"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "好"}]
    assert targets(later) == calling + answer + "好<|im_end|>"
