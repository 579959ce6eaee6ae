"""Base vs tuned for the chat page's compare: each engine with its adapter switched off answers
exactly as the base model does and switches back to the tuned answer exactly; two GGUF engines
(`serve --gguf --base-gguf`) answer under their own model names."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")  # serve_web is the page's module

from lora_helpers import make_peft_adapter, make_run

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.cli import cli
from qwen_mlx.inference import complete, open_engine
from qwen_mlx.serve.page import open_base

ASK = [{"role": "user", "content": "差旅费怎么报销？"}]
GREEDY = GenerationSettings(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A run folder holding a random (non-zero) adapter for the tiny model."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("compare")
    adapter = make_peft_adapter(tiny_model_dir, root / "adapter", b_std=0.05)
    return make_run(root / "run", tiny_model_dir, adapter)


def answer(engine) -> str:
    return complete(engine, ASK, GREEDY)[0]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_adapter_switches_off_to_the_base_and_back(backend, run, tiny_model_dir):
    pytest.importorskip("torch" if backend == "torch" else "mlx.core")
    tuned = open_engine(run, backend=backend)
    base = open_base(tuned, run, None, None)
    assert (tuned.model_id, base.model_id) == ("run", "tiny-qwen2")
    first = answer(tuned)
    off = answer(base)
    assert off != first
    assert off == answer(open_engine(None, model=tiny_model_dir, backend=backend))
    assert answer(tuned) == first  # switched back on: the tuned answer, exactly


def test_a_model_without_an_adapter_has_nothing_to_compare(tiny_model_dir):
    pytest.importorskip("torch")
    engine = open_engine(None, model=tiny_model_dir, backend="torch")
    assert open_base(engine, None, None, None) is None


@pytest.fixture(scope="module")
def ggufs(run, tiny_model_dir, tmp_path_factory):
    """(tuned, base) GGUF files of the run and of its base model."""
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from qwen_mlx.export.gguf import export

    root = tmp_path_factory.mktemp("gguf")
    tuned = export(run, root / "tuned.gguf").path
    return tuned, export(None, root / "base.gguf", model=tiny_model_dir).path


def test_two_ggufs_answer_under_their_own_names(ggufs, run):
    from serve_helpers import running
    from web_helpers import api_answer, http

    from qwen_mlx.inference import GGUFEngine
    from qwen_mlx.serve.server import Server

    tuned_path, base_path = ggufs
    tuned = GGUFEngine(tuned_path)
    base = open_base(tuned, run, None, base_path)
    with running(Server(tuned, base=base)) as port:
        url = f"http://127.0.0.1:{port}"
        listed = json.loads(http(f"{url}/v1/models")[1])["data"]
        assert [m["id"] for m in listed] == ["tuned", "base"]
        answers = {name: api_answer(url, name, ASK[0]["content"], 24) for name in ("tuned", "base")}
        assert answers["tuned"] != answers["base"]
        assert answers["base"] == answer(GGUFEngine(base_path))
        unknown = http(f"{url}/v1/chat/completions", body={"model": "x", "messages": ASK})
        assert unknown[0] == 404 and b"`tuned`, `base`" in unknown[1]


def test_base_gguf_needs_gguf(run, tmp_path):
    stray = tmp_path / "base.gguf"
    stray.write_bytes(b"GGUF")
    result = CliRunner().invoke(cli, ["serve", str(run), "--base-gguf", str(stray)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: --base-gguf")
    assert "Traceback" not in result.output


def test_serve_on_a_run_gives_the_page_its_base_run_and_system_prompt(
    run, tiny_model_dir, tmp_path
):
    pytest.importorskip("torch")
    system = "data.system_prompt=你是报销助手。"
    prompted = make_run(tmp_path / "run", tiny_model_dir, run / "adapter", system)
    served = {}
    with mock.patch("qwen_mlx.serve.server.run", lambda *args, **page: served.update(page)):
        result = CliRunner().invoke(cli, ["serve", str(prompted), "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert served["base"].model_id == "tiny-qwen2"
    assert served["run_dir"] == prompted
    assert served["system_prompt"] == "你是报销助手。"
