"""What only Qwen3 has: its family facts (explicit head_dim, q/k norms, no bias), the tiny
Qwen3 folder and template, the think block in prompts, ``check``, the Modelfile and GGUF
chat of a run tuned to reason, download, and the refusal of unsupported architectures.

What every family must do runs over ``FAMILIES`` elsewhere, Qwen3 included: training on both
backends (test_backend_contract.py), GGUF export (test_gguf_export.py), fuse (test_fuse.py),
loading in transformers and mlx-lm (test_tiny.py); the chat template and loss mask are in
test_qwen3_chat.py.
"""

from __future__ import annotations

import json

import pytest
from chat_helpers import ANSWER, QUESTION, text_ids
from jinja2 import Template

from qwen_mlx.families import QWEN3, family_of
from qwen_mlx.tensor_io import model_tensors

QWEN3_06B = {  # public config.json numbers of Qwen3-0.6B
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}


def _config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# ---------------------------------------------------------------- family


def test_qwen3_shapes_use_the_explicit_head_dim_and_have_qk_norms_and_no_bias():
    linear = QWEN3.linear_shapes(QWEN3_06B)
    # 16 heads of 128 = 2048, not hidden_size 1024.
    assert linear["q_proj"] == (1024, 2048) and linear["o_proj"] == (2048, 1024)
    assert linear["k_proj"] == (1024, 1024)
    shapes = QWEN3.tensor_shapes(QWEN3_06B)
    assert shapes["model.layers.27.self_attn.q_norm.weight"] == (128,)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (128,)
    assert not any(name.endswith(".bias") for name in shapes)
    assert "lm_head.weight" not in shapes  # 0.6B ties the output to the embeddings
    assert len(shapes) == 2 + 28 * 11
    untied = QWEN3.tensor_shapes({**QWEN3_06B, "tie_word_embeddings": False})
    assert untied["lm_head.weight"] == (151936, 1024)


def test_qwen3_config_is_the_qwen3_family_and_its_facts_match_its_template():
    assert family_of(QWEN3_06B, "models/Qwen3-0.6B") is QWEN3
    template = QWEN3.chat_template()
    assert "enable_thinking is defined and enable_thinking is false" in template
    assert "reasoning_content" in template
    assert QWEN3.stop_tokens == ("<|im_end|>", "<|endoftext|>")
    assert QWEN3.text_tokens == ("<think>", "</think>")


# ---------------------------------------------------------------- tiny Qwen3


def test_tiny_qwen3_has_qwen3_shapes_and_the_real_template(qwen3_dir):
    config = _config(qwen3_dir)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is False
    shapes = {name: ref.shape for name, ref in model_tensors(qwen3_dir).items()}
    assert shapes == QWEN3.tensor_shapes(config)
    tok_config = json.loads((qwen3_dir / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == QWEN3.chat_template()
    specials = {t["content"]: t["special"] for t in tok_config["added_tokens_decoder"].values()}
    assert specials == {
        "<|endoftext|>": True,
        "<|im_start|>": True,
        "<|im_end|>": True,
        "<think>": False,
        "</think>": False,
    }
    gen = json.loads((qwen3_dir / "generation_config.json").read_text())
    vocab = json.loads((qwen3_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]


def test_tiny_qwen3_template_renders_non_thinking_turns_like_qwen3(qwen3_tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    prompt = qwen3_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert (
        prompt == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Thinking on: the prompt ends where the model opens its own think block.
    thinking = qwen3_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert thinking.endswith("<|im_start|>assistant\n")
    ids = qwen3_tokenizer("<think>\n\n</think>")["input_ids"]
    assert qwen3_tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<think>", "</think>"]


def test_tiny_model_cli_builds_a_qwen3(tmp_path):
    from click.testing import CliRunner

    from qwen_mlx.cli import cli

    result = CliRunner().invoke(cli, ["tiny-model", str(tmp_path / "m"), "--arch", "qwen3"])
    assert result.exit_code == 0, result.output
    assert "tiny Qwen3 model" in result.output
    assert _config(tmp_path / "m")["model_type"] == "qwen3"


# ---------------------------------------------------------------- unsupported architectures

UNSUPPORTED = {  # model_type, architecture and (for wrappers) text_config as each one ships
    "Qwen2-MoE": {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]},
    "Qwen3-MoE": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]},
    "Qwen3-Next": {"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"]},
    "Qwen3.5": {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": {"model_type": "qwen3_5_text", "layer_types": ["linear_attention"]},
    },
    "Qwen2.5-VL": {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    },
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_architectures_are_refused_by_check_train_and_export(
    name, qwen3_dir, small_data, tmp_path, monkeypatch
):
    import shutil

    from cli_helpers import one_error_line, settings
    from click.testing import CliRunner

    from qwen_mlx.cli import cli

    monkeypatch.chdir(tmp_path)
    folder = shutil.copytree(qwen3_dir, tmp_path / "model")
    config = {**_config(folder), **UNSUPPORTED[name]}
    (folder / "config.json").write_text(json.dumps(config))
    arch = UNSUPPORTED[name]["architectures"][0]
    args = settings(folder, small_data, tmp_path)

    checked = CliRunner().invoke(cli, ["check", *args])
    assert checked.exit_code == 1
    (failed,) = [line for line in checked.output.splitlines() if "unsupported" in line]
    assert arch in failed and "Qwen3ForCausalLM" in checked.output
    error = one_error_line(CliRunner().invoke(cli, ["train", *args]))
    assert "unsupported architecture" in error and arch in error
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    out = tmp_path / "model.gguf"
    error = one_error_line(
        CliRunner().invoke(cli, ["export", "--model", str(folder), "-o", str(out)])
    )
    assert arch in error and "Qwen3ForCausalLM" in error and "Qwen2ForCausalLM" in error
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))


# ---------------------------------------------------------------- memory estimate


def test_memory_estimate_counts_qwen3_0_6b_and_its_wide_attention():
    from qwen_mlx.memory import estimate_training_memory, parameter_count

    # Qwen3-0.6B's model card: 0.6B parameters, 0.44B of them outside the embeddings.
    embeddings = 151936 * 1024
    assert round(parameter_count(QWEN3_06B) / 1e9, 2) == 0.60
    assert round((parameter_count(QWEN3_06B) - embeddings) / 1e9, 2) == 0.44

    def activations(config):
        settings = {"rank": 8, "targets": ["q_proj"], "max_seq_length": 1024, "batch_size": 1}
        return estimate_training_memory(config, quantization="none", **settings).parts[
            "activations"
        ]

    # 16 heads of 128 make the queries twice the hidden size: more to keep than if head_dim
    # were hidden/heads.
    narrow = {**QWEN3_06B, "head_dim": 64}
    assert activations(QWEN3_06B) > activations(narrow)


# ---------------------------------------------------------------- training on both backends


def test_liger_patches_a_qwen3_with_its_qwen3_kernels(monkeypatch):
    import sys
    import types
    from unittest import mock

    pytest.importorskip("torch")
    from qwen_mlx.backends.torch_model import apply_liger

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen3 = mock.Mock()
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen3"))
    apply_liger(model)
    assert fake.apply_liger_kernel_to_qwen3.call_args.kwargs["model"] is model


# ---------------------------------------------------------------- prompts as trained


def _tuned_run(trained_runs, data, folder, thinking: bool):
    """A copy of the tiny Qwen3's torch run whose config says chat.enable_thinking."""
    import shutil

    from train_helpers import run_config

    from qwen_mlx.config_file import save_config

    trained = trained_runs("torch", QWEN3.name, "short")
    run = shutil.copytree(trained.run, folder)
    setting = f"chat.enable_thinking={str(thinking).lower()}"
    save_config(run_config(trained.model_dir, data, run, setting), run / "config.yaml")
    return run


@pytest.mark.parametrize("thinking", [False, True])
def test_engine_prompts_follow_the_runs_chat_enable_thinking(
    thinking, trained_runs, small_data, tmp_path
):
    # eval, chat and serve all open their engine with open_engine and ask it for prompts.
    from qwen_mlx.inference import open_engine

    run = _tuned_run(trained_runs, small_data, tmp_path / "run", thinking)
    engine = open_engine(run, backend="torch")
    ids = engine.prompt_ids([QUESTION], 64)
    tokenizer = engine.tokenizer
    rendered = tokenizer.apply_chat_template(
        [QUESTION], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    assert ids == text_ids(tokenizer, rendered)
    assert rendered.endswith("<think>\n\n</think>\n\n") is not thinking


# ---------------------------------------------------------------- check and download


def test_download_and_check_recognise_a_qwen3_folder(qwen3_dir, small_data, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from download_helpers import EXCLUDED, REPO, FakeHub, assert_complete, run_download

    from qwen_mlx.cli import cli
    from qwen_mlx.outputs import OUTPUT_MARK

    files = {p.name: p.read_bytes() for p in qwen3_dir.iterdir() if p.name != OUTPUT_MARK}
    hub = FakeHub({**files, **EXCLUDED})
    try:
        result = run_download(tmp_path, hub.url, REPO)  # the fake hub's one repo id
    finally:
        hub.close()
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "models" / REPO
    assert_complete(folder, files)  # every check finding is ok
    monkeypatch.chdir(tmp_path)  # no config.yaml here: only the settings below count
    sets = [f"model.path={folder}", f"data.train_file={small_data}", "model.quantization=none"]
    checked = CliRunner().invoke(cli, ["check", *(a for s in sets for a in ("--set", s))])
    assert "✓ model: architecture — qwen3 (Qwen3ForCausalLM)" in checked.output, checked.output
    assert "✓ memory — needs ≈" in checked.output  # the estimate, from Qwen3's shapes
    assert checked.exit_code == 0


@pytest.mark.parametrize(
    ("thinking", "line"),
    [
        ("false", "⚠ chat.enable_thinking — 2 training turns carry reasoning, but prompts"),
        ("true", "✓ chat.enable_thinking — on: trained and prompted to think"),
    ],
)
def test_check_says_whether_enable_thinking_fits_the_data(
    thinking, line, qwen3_dir, tiny_model_dir, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from qwen_mlx.cli import cli

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    inline = {**ANSWER, "content": "<think>查第三条。</think>" + ANSWER["content"]}
    record = {"messages": [QUESTION, {**ANSWER, "reasoning": "查第三条。"}, QUESTION, inline]}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")

    def check(model):
        sets = [
            f"model.path={model}",
            f"data.train_file={data}",
            f"chat.enable_thinking={thinking}",
        ]
        return CliRunner().invoke(cli, ["check", *(a for s in sets for a in ("--set", s))]).output

    assert line in check(qwen3_dir)
    assert "chat.enable_thinking" not in check(tiny_model_dir)  # Qwen2 has no think block


@pytest.mark.parametrize("thinking", [False, True])
def test_eval_prompts_a_gguf_and_the_base_as_the_run_was_trained(
    thinking, trained_runs, small_data, tmp_path, monkeypatch
):
    import types

    from rich.console import Console

    from qwen_mlx.eval import evaluate

    run = _tuned_run(trained_runs, small_data, tmp_path / "run", thinking)
    asked = []

    def run_model(engine, label, *args):
        asked.append((label, engine.thinking))
        if label == "base":
            raise KeyboardInterrupt  # enough: both engines were set up
        return types.SimpleNamespace()  # the tuned model's result

    def engine(*args, **kwargs):  # no adapter and no tokenizer: no drift to measure
        return types.SimpleNamespace(has_adapter=False, tokenizer=None)

    monkeypatch.setattr(evaluate, "GGUFEngine", engine)
    monkeypatch.setattr(evaluate, "open_engine", engine)
    monkeypatch.setattr(evaluate, "run_model", run_model)
    for gguf in (tmp_path / "x.gguf", None):
        with pytest.raises(KeyboardInterrupt):
            evaluate.evaluate(
                run, small_data, gguf=gguf, compare_base=True, console=Console(quiet=True)
            )
    assert asked == [("tuned", thinking), ("base", thinking)] * 2


# ---------------------------------------------------------------- GGUF of a run tuned to reason


def test_a_run_tuned_to_reason_gets_the_thinking_template(qwen3_dir, tmp_path):
    # chat.enable_thinking: the model opens its own think block; ollama's think: false (and
    # only that) puts the empty one first. Qwen2 has no think block: its template stays.
    pytest.importorskip("peft")
    from lora_helpers import gguf_fields, make_peft_adapter, make_run

    from qwen_mlx.export.gguf import export
    from qwen_mlx.export.modelfile import modelfile_text
    from qwen_mlx.families import QWEN2

    adapter = make_peft_adapter(qwen3_dir, tmp_path / "adapter")
    run = make_run(tmp_path / "run", qwen3_dir, adapter, "chat.enable_thinking=true")
    export(run, tmp_path / "thinks.gguf", quant="q8_0")
    modelfile = (tmp_path / "thinks.Modelfile").read_text()
    # The thinking form of the template (rendered as ollama does in test_ollama_template.py).
    assert f'TEMPLATE """{QWEN3.ollama_template(thinking=True)}"""' in modelfile
    assert "{{- $tunedToThink := true }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # The GGUF's own template, rendered without enable_thinking, leaves the block to the model.
    template = gguf_fields(tmp_path / "thinks.gguf")["tokenizer.chat_template"]
    turn = [QUESTION]
    prompt = Template(template).render(messages=turn, add_generation_prompt=True)
    assert prompt.endswith(f"{QUESTION['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert modelfile_text("q.gguf", None, QWEN2, True) == modelfile_text(
        "q.gguf", None, QWEN2, False
    )


def test_chat_and_serve_on_a_gguf_prompt_as_its_run_was_tuned(
    qwen3_dir, qwen3_tokenizer, tmp_path, monkeypatch
):
    # `chat --gguf` / `serve --gguf` have no run folder: the GGUF's template, which the export
    # made default to the run's chat.enable_thinking, decides; an explicit setting still wins.
    pytest.importorskip("llama_cpp")
    from qwen_mlx import adapters
    from qwen_mlx.export.gguf import export
    from qwen_mlx.inference import GGUFEngine

    monkeypatch.setattr(adapters.Source, "thinking", property(lambda self: True))
    engine = GGUFEngine(export(None, tmp_path / "thinks.gguf", model=qwen3_dir).path)
    turn = [QUESTION]

    def prompt() -> str:
        return engine.llm.detokenize(engine.prompt_ids(turn, 16), special=True).decode()

    def rendered(thinking: bool) -> str:
        return qwen3_tokenizer.apply_chat_template(
            turn, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )

    assert prompt() == rendered(True)  # as the run was tuned
    for thinking in (False, True):
        engine.thinking = thinking
        assert prompt() == rendered(thinking)
