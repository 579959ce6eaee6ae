"""Qwen3 end to end: the family's facts, the tiny Qwen3 folder, its chat template and loss mask.

The tiny Qwen3 (``tiny-model --arch qwen3``) is what tests and demos exercise in place of a
downloaded Qwen3: transformers and mlx-lm must load it through their own qwen3 code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from qwen_mlx.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", arch="qwen3")


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen3_dir)


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
    ids = qwen3_tokenizer("<think>\n\n</think>")["input_ids"]
    assert qwen3_tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<think>", "</think>"]


def test_transformers_and_mlx_lm_load_the_tiny_qwen3_with_the_same_logits(qwen3_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    ids = [[5, 70, 300, 12, 900, 41]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    model, _ = mlx_lm.load(str(qwen3_dir))
    assert type(model).__module__ == "mlx_lm.models.qwen3"
    model.set_dtype(mx.float32)
    got = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_tiny_model_cli_builds_a_qwen3(tmp_path):
    from click.testing import CliRunner

    from qwen_mlx.cli import cli

    result = CliRunner().invoke(cli, ["tiny-model", str(tmp_path / "m"), "--arch", "qwen3"])
    assert result.exit_code == 0, result.output
    assert "tiny Qwen3 model" in result.output
    assert _config(tmp_path / "m")["model_type"] == "qwen3"
