"""Serving a run to many users with an existing engine (docs/serving.md).

vLLM's LoRA checks, as facts read from its source, against the adapters our backends and
``adapter convert`` write and against the adapter settings vLLM refuses; the command lines
``export --print-serve-commands`` fills in for a run; and llama.cpp (llama-cpp-python's
OpenAI server, the one llama.cpp server that runs here) serving our GGUF and our LoRA GGUF
to clients that ask at the same time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from serve_helpers import free_port

from qwen_mlx.cli import cli
from qwen_mlx.errors import UserError
from qwen_mlx.export.serving import vllm_lora_modules, vllm_max_lora_rank, vllm_problems
from qwen_mlx.model_files import read_model_config

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter(family_model_dir, tmp_path_factory) -> Path:
    """PEFT's own adapter (as the torch backend saves it), rank 32 as the enhanced preset."""
    from lora_helpers import make_peft_adapter

    out = tmp_path_factory.mktemp("serving") / "adapter"
    return make_peft_adapter(family_model_dir, out, rank=32, alpha=64)


def _expected(family, family_model_dir) -> set[str]:
    return vllm_lora_modules(family, read_model_config(family_model_dir))


def test_vllm_gives_lora_to_every_linear_layer_we_train(family, family_model_dir):
    from qwen_mlx.config import ALL_LINEAR

    modules = _expected(family, family_model_dir)
    assert set(ALL_LINEAR) <= modules and {"qkv_proj", "gate_up_proj"} <= modules


def test_our_adapters_pass_vllms_checks(family, family_model_dir, adapter, tmp_path):
    from qwen_mlx.adapter_convert import convert_adapter

    expected = _expected(family, family_model_dir)
    assert vllm_problems(adapter, expected) == []
    # What our MLX backend and `adapter convert` write (our own PEFT config and tensor names).
    mlx = convert_adapter(adapter, "mlx-lm", tmp_path / "mlx")
    ours = convert_adapter(mlx, "peft", tmp_path / "peft")
    assert vllm_problems(ours, expected) == []
    # mlx-lm's layout is not one vLLM reads: the fix is named.
    (problem,) = vllm_problems(mlx, expected)
    assert "adapter convert" in problem and "--to peft" in problem


@pytest.mark.parametrize(
    "change, words",
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
        ({"r": 1024}, "largest --max-lora-rank"),
        ({"lora_alpha": None}, "lacks lora_alpha"),
    ],
)
def test_what_vllm_refuses_in_an_adapter_config(
    family, family_model_dir, adapter, tmp_path, change, words
):
    import shutil

    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (problem,) = vllm_problems(copy, _expected(family, family_model_dir))
    assert words in problem and "\n" not in problem


def test_vllm_refuses_lora_on_a_layer_it_does_not_adapt(
    family, family_model_dir, adapter, tmp_path
):
    import shutil

    from safetensors.numpy import load_file, save_file

    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    tensors = load_file(copy / "adapter_model.safetensors")
    first = next(name for name in tensors if name.endswith("q_proj.lora_A.weight"))
    tensors[first.replace("self_attn.q_proj", "rotary_emb")] = tensors[first]
    save_file(tensors, copy / "adapter_model.safetensors")
    (problem,) = vllm_problems(copy, _expected(family, family_model_dir))
    assert "rotary_emb" in problem


@pytest.mark.parametrize("rank, flag", [(1, 1), (8, 8), (16, 16), (20, 32), (32, 32), (300, 320)])
def test_the_max_lora_rank_vllm_accepts(rank, flag):
    assert vllm_max_lora_rank(rank) == flag


def test_a_rank_above_vllms_largest_is_one_clear_line():
    with pytest.raises(UserError, match=r"llama\.cpp or ollama"):
        vllm_max_lora_rank(513)


# ---------------------------------------------------------------- the printed commands


def _run(family_model_dir, adapter, tmp_path, *overrides) -> Path:
    from lora_helpers import make_run

    return make_run(tmp_path / "bx", family_model_dir, adapter, *overrides)


def test_print_serve_commands_fills_in_the_run_and_writes_nothing(
    family, family_model_dir, adapter, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run = _run(family_model_dir, adapter, tmp_path)
    args = ["export", "bx", "-o", "out/bx.gguf", "--print-serve-commands"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    vllm = f"vllm serve {family_model_dir} --enable-lora --lora-modules bx=bx/adapter"
    vllm += " --max-lora-rank 32"  # the adapter's rank 32 is above vLLM's default 16
    if family.thinks:  # a run tuned without reasoning answers directly, as trained
        vllm += " --default-chat-template-kwargs '{\"enable_thinking\": false}'"
    assert vllm in lines
    assert "llama-server -m out/bx.gguf --parallel 4 --ctx-size 16384 --jinja" in lines
    assert "OLLAMA_NUM_PARALLEL=4 ollama serve" in lines
    assert "ollama create bx -f out/bx.Modelfile" in lines
    assert not (tmp_path / "out").exists() and run.is_dir()


def test_a_run_tuned_to_reason_keeps_vllms_thinking_default(
    qwen3_dir, tmp_path, monkeypatch, tiny_models
):
    from lora_helpers import make_peft_adapter

    adapter = make_peft_adapter(qwen3_dir, tmp_path / "adapter", rank=8)
    _run(qwen3_dir, adapter, tmp_path, "chat.enable_thinking=true")
    monkeypatch.chdir(tmp_path)
    args = ["export", "bx", "-o", "bx.gguf", "--print-serve-commands"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "--max-lora-rank 8\n" in result.output and "enable_thinking" not in result.output


def test_an_adapter_vllm_refuses_gets_no_vllm_line(family_model_dir, adapter, tmp_path):
    import shutil

    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    config = json.loads((copy / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"q_proj": 8}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    args = ["export", str(copy), "--model", str(family_model_dir), "-o", str(tmp_path / "x.gguf")]
    result = CliRunner().invoke(cli, [*args, "--print-serve-commands"])
    assert result.exit_code == 0, result.output
    assert "vllm serve" not in result.output and "alpha_pattern" in result.output
    assert "llama-server" in result.output


# ---------------------------------------------------------------- llama.cpp, many clients


def _server(gguf: Path, *extra: str):
    """llama-cpp-python's OpenAI server on ``gguf``; yields its base URL."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette", reason="needs llama-cpp-python's [server] extra")
    pytest.importorskip("pydantic_settings", reason="needs llama-cpp-python's [server] extra")
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "1"]
    process = subprocess.Popen(
        [*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"llama_cpp.server did not start: {process.stderr.read()[-2000:]}")
            time.sleep(0.3)


def _ask(url: str, question: str) -> str:
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 12,
        "temperature": 0,
        "seed": 0,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


QUESTIONS = ["住宿费标准是多少？", "交通费怎么报？", "出差补助多少？", "发票丢了怎么办？"] * 2


def _answers(gguf: Path, *extra: str) -> tuple[list[str], list[str]]:
    """The answers to the first four questions asked one at a time, and to all of them asked
    at once, by a server on ``gguf``."""
    process, url = _server(gguf, *extra)
    try:
        one_by_one = [_ask(url, q) for q in QUESTIONS[:4]]
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            at_once = list(pool.map(lambda q: _ask(url, q), QUESTIONS))
    finally:
        process.terminate()
        process.wait(timeout=30)
    return one_by_one, at_once


def test_llama_cpp_serves_our_gguf_and_lora_gguf_to_clients_asking_at_once(
    family, family_model_dir, adapter, tmp_path
):
    pytest.importorskip("gguf")
    from qwen_mlx.export.gguf import export

    base = export(None, tmp_path / "base.gguf", model=family_model_dir).path
    lora = export(adapter, tmp_path / "lora.gguf", model=family_model_dir, lora_only=True).path
    alone, at_once = _answers(base)
    # Every client gets its own answer: the one it gets when it asks alone (greedy).
    assert at_once == alone * 2
    tuned_alone, tuned_at_once = _answers(base, "--lora_path", str(lora))
    assert tuned_at_once == tuned_alone * 2
    assert tuned_alone != alone  # the server applies the LoRA GGUF
