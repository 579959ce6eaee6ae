"""`qwen-mlx chat`: one greedy answer, the same through every engine; interactive commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from repo_helpers import BUNDLED_TEST
from rich.console import Console

from qwen_mlx.chat import Conversation, handle_command

QUESTION = "出差住宿标准是多少？"


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A short torch run (its adapter moves the logits) to chat with."""
    pytest.importorskip("torch")
    from train_helpers import QUIET, run_config

    from qwen_mlx.config_file import save_config
    from qwen_mlx.training_run import train

    root = tmp_path_factory.mktemp("chat")
    rows = [json.loads(x) for x in BUNDLED_TEST.read_text(encoding="utf-8").splitlines()[:8]]
    data = root / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    cfg = run_config(
        tiny_model_dir,
        data,
        root / "run",
        "data.valid_ratio=0",
        "training.backend=torch",
        "training.num_epochs=10",
        "lora.rank=16",
        "lora.alpha=32",
    )
    (root / "run").mkdir()
    save_config(cfg, root / "run" / "config.yaml")
    train(cfg, root / "run", False, QUIET)
    return root / "run"


def chat(*args, stdin: str | None = None):
    out = subprocess.run(
        [sys.executable, "-m", "qwen_mlx", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_same_greedy_answer_through_torch_and_mlx(run):
    pytest.importorskip("mlx.core")
    torch_answer = chat(str(run), "--backend", "torch", "--prompt", QUESTION, "--max-tokens", "12")
    mlx_answer = chat(str(run), "--backend", "mlx", "--prompt", QUESTION, "--max-tokens", "12")
    assert torch_answer.strip() and torch_answer == mlx_answer


def test_same_greedy_answer_from_the_exported_gguf(run, tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = tmp_path / "run.gguf"
    export = subprocess.run(
        [sys.executable, "-m", "qwen_mlx", "export", str(run), "-o", str(gguf), "--quant", "f16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert export.returncode == 0, export.stderr
    torch_answer = chat(str(run), "--backend", "torch", "--prompt", QUESTION, "--max-tokens", "12")
    gguf_answer = chat("--gguf", str(gguf), "--prompt", QUESTION, "--max-tokens", "12")
    assert torch_answer.strip() and gguf_answer == torch_answer


def test_interactive_commands():
    console = Console(quiet=True)
    conversation = Conversation("旧的系统提示")
    conversation.add("问", "答")
    assert handle_command("/system 你是报销助手", conversation, console)
    assert conversation.system == "你是报销助手" and conversation.turns == []
    conversation.add("问", "答")
    assert conversation.messages("再问")[0] == {"role": "system", "content": "你是报销助手"}
    assert len(conversation.messages("再问")) == 4
    assert handle_command("/reset", conversation, console) and conversation.turns == []
    assert not handle_command("/exit", conversation, console)


def test_interactive_session_keeps_history(tiny_model_dir):
    pytest.importorskip("torch")
    out = chat(
        "--model",
        str(tiny_model_dir),
        "--backend",
        "torch",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        stdin="你好\n发票丢了怎么办\n/reset\n/exit\n",
    )
    assert out.count("model>") == 2 and "conversation cleared" in out


def test_a_conversation_too_long_for_the_context_keeps_the_session(monkeypatch):
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.chat import interactive
    from qwen_mlx.chat_template import PromptTooLong

    class Full:  # an engine whose context the conversation has outgrown
        from qwen_mlx.families import QWEN2 as family

        description = "full"

        def prompt_ids(self, messages, max_tokens):
            raise PromptTooLong(5000, 4000)

    lines = iter(["你好", "/exit"])
    monkeypatch.setattr("builtins.input", lambda *args: next(lines))
    console = Console(record=True, width=200)
    interactive(Full(), GenerationSettings(), None, console)
    assert "the prompt is 5000 tokens" in console.export_text()  # said, and still chatting


class _ThinkingEngine:
    """Streams a reply that opens with a think block, cut mid-tag as a tokenizer may."""

    from qwen_mlx.families import QWEN3 as family

    def prompt_ids(self, messages, max_tokens):
        return [1, 2, 3]

    def pieces(self, prompt_ids, settings):
        yield from ["<thi", "nk>\n想一想：住宿", "标准看城市。\n</th", "ink>\n\n", "每晚500元。"]


def test_a_think_block_is_shown_apart_and_never_kept_as_the_answer():
    import io

    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.chat import reply

    out, thoughts = io.StringIO(), []
    messages = [{"role": "user", "content": QUESTION}]
    answer = reply(_ThinkingEngine(), messages, GenerationSettings(), out, thoughts.append)
    assert answer == "每晚500元。"
    assert out.getvalue() == "每晚500元。\n"  # --prompt prints only the answer
    assert "".join(thoughts) == "想一想：住宿标准看城市。"
