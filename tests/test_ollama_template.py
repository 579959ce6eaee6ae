"""Our Modelfile's TEMPLATE as ollama renders it, against the family's Hugging Face template.

ollama is not installed here, so ``tests/go/render_ollama.go`` (built once a session with the
system's ``go``; these tests skip without it) executes the TEMPLATE with Go's own
``text/template``, fed the way ollama's chat path feeds it: the Modelfile's SYSTEM as a first
message, consecutive turns merged, Qwen3's earlier think blocks dropped, think: true sent by
default to a thinking-capable template (ollama >= 0.12.4), tool calls and tools as ollama's
JSON. It also applies ollama's checks that keep a Modelfile TEMPLATE over the GGUF's own chat
template (ollama >= 0.30), and reads the tool-call tag and think tags ollama infers from it.

The prompt must be the text ``apply_chat_template`` renders for the same conversation, except
that JSON (tools, tool-call arguments) is ollama's compact JSON: lines holding a JSON object
are compared as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from chat_helpers import QUESTION

from qwen_mlx.export.modelfile import default_system, modelfile_text
from qwen_mlx.families import QWEN2, QWEN3

GO_SOURCE = Path(__file__).parent / "go" / "render_ollama.go"
SYSTEM = {"role": "system", "content": "你是报销助手。"}
FOLLOW_UP = {"role": "user", "content": "那交通费呢？"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_rule",
            "description": "查报销细则 <条款> & 限额",
            "parameters": {
                "type": "object",
                "properties": {
                    "item": {"type": "string", "description": "费用类别"},
                    "city": {"type": "string", "enum": ["北京", "上海"]},
                },
                "required": ["item"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "today",
            "description": "Today's date",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]


def _call(name: str, **arguments) -> dict:
    return {"function": {"name": name, "arguments": arguments}}


ANSWERED = {"role": "assistant", "content": "500元。"}
CALL = _call("lookup_rule", item="住宿", city="北京")
RESULT = {"role": "tool", "content": '{"limit": 500}'}
# Conversations as an ollama /api/chat request sends them (reasoning in "thinking").
CONVERSATIONS: dict[str, tuple[list[dict], list[dict] | None]] = {
    "user": ([QUESTION], None),
    "system": ([SYSTEM, QUESTION], None),
    "multi-turn": ([SYSTEM, QUESTION, ANSWERED, FOLLOW_UP], None),
    "system-later": ([QUESTION, ANSWERED, SYSTEM, FOLLOW_UP], None),
    "tools": ([QUESTION], TOOLS),
    "system-and-tools": ([SYSTEM, QUESTION], TOOLS),
    "tool-results": (
        [
            QUESTION,
            {"role": "assistant", "content": "", "tool_calls": [CALL, _call("today")]},
            RESULT,
            {"role": "tool", "content": "2025-06-01"},
        ],
        TOOLS,
    ),
    "text-and-call-then-answer": (
        [
            SYSTEM,
            QUESTION,
            {"role": "assistant", "content": "我查一下。", "tool_calls": [CALL]},
            RESULT,
            {"role": "assistant", "content": "每晚500元。"},
            FOLLOW_UP,
        ],
        TOOLS,
    ),
    "reasoning-in-the-tool-loop": (
        [
            QUESTION,
            {"role": "assistant", "content": "", "thinking": "\n查细则。\n", "tool_calls": [CALL]},
            RESULT,
        ],
        TOOLS,
    ),
    "earlier-reasoning": (
        [
            QUESTION,
            {"role": "assistant", "content": "500元。", "thinking": "查第三条。"},
            {"role": "user", "content": "<think>不是推理</think>"},
            {"role": "assistant", "content": "<think>\n旧的\n</think>\n\n好的。"},
            FOLLOW_UP,
        ],
        None,
    ),
}


def _hf_messages(messages: list[dict]) -> list[dict]:
    """The conversation as transformers' chat templates read it."""
    out = []
    for message in messages:
        message = dict(message)
        if "thinking" in message:
            message["reasoning_content"] = message.pop("thinking")
        if "tool_calls" in message:
            message["tool_calls"] = [
                {"type": "function", "function": call["function"]} for call in message["tool_calls"]
            ]
        out.append(message)
    return out


def _json_as_json(text: str) -> str:
    """``text`` with each line that is a JSON object written canonically (sorted keys,
    compact), so that only JSON formatting may differ."""
    lines = []
    for line in text.split("\n"):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):  # not JSON: compared as text
                line = json.dumps(json.loads(line), ensure_ascii=False, sort_keys=True)
        lines.append(line)
    return "\n".join(lines)


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory):
    """A function that renders a Modelfile's TEMPLATE as ollama's chat path does (see
    tests/go/render_ollama.go); the program is built once a session."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs Go (Debian: apt-get install golang-go) to run Go's text/template")
    folder = tmp_path_factory.mktemp("render_ollama")
    binary = folder / "render_ollama"
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOFLAGS": "", "GO111MODULE": "off"}
    built = subprocess.run(
        [go, "build", "-o", str(binary), str(GO_SOURCE)], env=env, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr

    def render(modelfile: str, chat_template: str, family, messages, **request) -> dict:
        body = {
            "modelfile": modelfile,
            "chat_template": chat_template,
            "model_family": family.name,
            "messages": messages,
            "think_default": True,
            **request,
        }
        done = subprocess.run(
            [str(binary)], input=json.dumps(body), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


@pytest.fixture(scope="module")
def exported(family, family_model_dir, tmp_path_factory) -> tuple[str, str]:
    """The Modelfile ``export`` writes for the family's tiny model, and the chat template in
    its GGUF (what ollama >= 0.30 weighs the Modelfile's TEMPLATE against)."""
    gguf = pytest.importorskip("gguf")
    from qwen_mlx.export.gguf import export

    out = tmp_path_factory.mktemp(f"ollama-{family.name}") / "tiny.gguf"
    result = export(None, out, model=family_model_dir)
    field = gguf.GGUFReader(result.path).fields["tokenizer.chat_template"]
    return result.modelfile.read_text(encoding="utf-8"), field.contents()


def _modelfile(family, exported, thinking: bool) -> str:
    """The exported Modelfile; for a run tuned to reason, the one its export writes."""
    if not thinking:
        return exported[0]
    system = default_system(exported[1], family)
    return modelfile_text("tiny.gguf", system, family, True)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ollama_renders_what_the_chat_template_renders(
    name, family, family_tokenizer, exported, ollama_render
):
    from qwen_mlx.chat_template import hf_render

    messages, tools = CONVERSATIONS[name]
    for thinking in (False, True) if family.thinks else (False,):
        modelfile = _modelfile(family, exported, thinking)
        request = {"tools": tools} if tools else {}
        out = ollama_render(modelfile, exported[1], family, messages, think=None, **request)
        assert out["selected"] == "go_template" and not out.get("error")
        # A request that does not say: the run's own default (ollama sends think: true, which
        # a run tuned without reasoning does not follow).
        want = hf_render(family_tokenizer, _hf_messages(messages), True, tools, thinking)
        assert _json_as_json(out["prompt"]) == _json_as_json(want), (name, thinking)


@pytest.mark.parametrize("think", [None, True, False])
@pytest.mark.parametrize("think_default", [True, False], ids=["ollama>=0.12.4", "ollama<0.12.4"])
@pytest.mark.parametrize("tuned_to_think", [False, True], ids=["tuned-plain", "tuned-thinking"])
def test_qwen3_replies_open_as_the_run_was_tuned_unless_think_false(
    tuned_to_think, think_default, think, qwen3_tokenizer, tiny_models, ollama_render, tmp_path
):
    from qwen_mlx.chat_template import hf_render
    from qwen_mlx.families import family_of
    from qwen_mlx.model_files import read_model_config

    model_dir = tiny_models(QWEN3.name)
    assert family_of(read_model_config(model_dir), model_dir) is QWEN3
    chat_template = QWEN3.chat_template()
    modelfile = modelfile_text("q.gguf", None, QWEN3, tuned_to_think)
    out = ollama_render(
        modelfile, chat_template, QWEN3, [QUESTION], think=think, think_default=think_default
    )
    assert out["selected"] == "go_template" and not out.get("error")
    enable_thinking = tuned_to_think and think is not False
    want = hf_render(qwen3_tokenizer, [QUESTION], True, None, enable_thinking)
    assert out["prompt"] == want


def test_qwen2_accepts_think_false_and_refuses_think_true_as_ollama_does(
    tiny_tokenizers, ollama_render
):
    from qwen_mlx.chat_template import hf_render

    modelfile = modelfile_text("q.gguf", QWEN2.default_system_prompt, QWEN2, False)
    chat = QWEN2.chat_template()
    out = ollama_render(modelfile, chat, QWEN2, [QUESTION], think=False)
    assert out["prompt"] == hf_render(tiny_tokenizers(QWEN2.name), [QUESTION], True)
    out = ollama_render(modelfile, chat, QWEN2, [QUESTION], think=True)
    assert out["error"] == "does not support thinking" and out["prompt"] is None


@pytest.mark.parametrize("thinking", [False, True])
def test_ollama_keeps_our_template_and_reads_its_tags(family, exported, ollama_render, thinking):
    # ollama >= 0.30 drops a Modelfile TEMPLATE that can do less than the GGUF's template
    # (tools, thinking, tool round trips); it finds tool calls and reasoning in the model's
    # output by the tags it reads from the TEMPLATE.
    out = ollama_render(_modelfile(family, exported, thinking), exported[1], family, [QUESTION])
    want = ["thinking", "tools"] if family.thinks else ["tools"]
    assert out["chat_template_capabilities"] == want
    assert out["go_capabilities"] == want
    assert out["selected"] == "go_template"
    assert out["tool_call_tag"] == "<tool_call>"
    assert out["think_tags"] == (list(family.think_tags) if family.thinks else ["", ""])


def test_the_checks_catch_a_template_ollama_would_drop(family, exported, ollama_render):
    # The ChatML template of earlier exports: no tools, no reasoning. ollama >= 0.30 prefers
    # the GGUF's template over it; older ollama refuses requests with tools.
    chatml = (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    )
    modelfile = f'FROM ./tiny.gguf\nTEMPLATE """{chatml}"""\n'
    out = ollama_render(modelfile, exported[1], family, [QUESTION], tools=TOOLS)
    assert out["selected"] == "gguf_chat_template"
    assert out["error"] == "does not support tools"
    assert out["tool_call_tag"] == "{" and out["think_tags"] == ["", ""]


def test_the_modelfile_system_and_parameters_reach_ollama(family, exported, ollama_render):
    out = ollama_render(exported[0], exported[1], family, [QUESTION])
    system = family.default_system_prompt
    assert out["system"] == system
    names = {"repetition_penalty": "repeat_penalty"}
    want = {names.get(k, k): [str(v)] for k, v in family.tiny.sampling.items()}
    assert {k: v for k, v in out["parameters"].items() if k != "stop"} == want
    assert out["parameters"]["stop"] == list(family.stop_tokens)
