"""The model-family registry: which family a config.json belongs to, and Qwen2's facts."""

from __future__ import annotations

import json

import pytest

from qwen_mlx.errors import UserError
from qwen_mlx.families import QWEN2, family_of, find_family


def test_the_tiny_model_is_qwen2_and_its_weights_have_the_familys_shapes(tiny_model_dir):
    from qwen_mlx.tensor_io import model_tensors

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert family_of(config, tiny_model_dir) is QWEN2
    shapes = {name: ref.shape for name, ref in model_tensors(tiny_model_dir).items()}
    assert shapes == QWEN2.tensor_shapes(config)


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        {"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]},
        {},
    ],
)
def test_other_models_are_one_error_line_naming_the_folder(config):
    assert find_family(config) is None
    with pytest.raises(UserError, match=r"^models/x is .*; qwen-mlx supports Qwen2") as err:
        family_of(config, "models/x")
    assert "\n" not in str(err.value)


def test_qwen2_shapes_follow_the_config_gqa_and_untied_output():
    config = {  # Qwen2.5-7B's numbers: untied, 4 KV heads of 128
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    }
    linear = QWEN2.linear_shapes(config)
    assert linear["k_proj"] == (3584, 512) and linear["o_proj"] == (3584, 3584)
    assert linear["down_proj"] == (18944, 3584)
    shapes = QWEN2.tensor_shapes(config)
    assert shapes["lm_head.weight"] == (152064, 3584)
    assert shapes["model.layers.27.self_attn.k_proj.bias"] == (512,)
    assert len(shapes) == 3 + 28 * 12


def test_qwen2_chat_facts_match_its_template():
    template = QWEN2.chat_template()
    assert QWEN2.default_system_prompt in template
    assert QWEN2.turn_start in template and QWEN2.turn_end in template
    assert QWEN2.stop_tokens == ("<|im_end|>", "<|endoftext|>")
