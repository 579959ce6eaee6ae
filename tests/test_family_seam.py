"""A model family is one declaration: a made-up family, declared here and nowhere else, is
honoured by the tiny-model builder, tokenization and the loss mask, the reply's think-block
split and the GGUF writer (tokens, stop tokens and its tensor transform).

The family differs from Qwen wherever a family may: its own control tokens, its own think
tags and chat template, and an export transform that reorders q_proj rows (the seam
llama.cpp's converter uses for models whose q/k rows need permuting). If any of these facts
still lived outside ``Family``, one of these tests would see Qwen's instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from qwen_mlx import families
from qwen_mlx.families import QWEN2, Family, TinyFacts

TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|turn|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' and m.reasoning_content %}"
    "{{- '<reason>\\n' + m.reasoning_content + '\\n</reason>\\n\\n' }}"
    "{%- endif %}"
    "{{- m.content + '<|/turn|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|turn|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}"
    "{{- '<reason>\\n\\n</reason>\\n\\n' }}{%- endif %}{%- endif %}"
)


def _reversed_q_rows(name: str, config: dict):
    """Reverse the rows of q_proj (weight and bias); any other tensor stays as it is."""
    if ".self_attn.q_proj." in name:
        return lambda values: values[::-1].copy()
    return None


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Family:
    template = tmp_path_factory.mktemp("toy") / "toy.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    ollama_template = template.with_name("toy.gotmpl")
    ollama_template.write_text("{{ .Prompt }}", encoding="utf-8")
    return dataclasses.replace(
        QWEN2,  # Qwen2's shapes and GGUF architecture; every other fact is the toy's own
        name="toy",
        description="Toy models (model_type toy)",
        model_types=("toy",),
        architectures=("ToyForCausalLM",),
        document_end="<|doc|>",
        turn_start="<|turn|>",
        turn_end="<|/turn|>",
        default_system_prompt="",
        chat_template_file=str(template),
        ollama_template_file=str(ollama_template),
        think_tags=("<reason>", "</reason>"),
        empty_think="<reason>\n\n</reason>\n\n",
        text_tokens=("<reason>", "</reason>"),
        gguf_transform=_reversed_q_rows,
        tiny=TinyFacts(transformers_version="4.51.0", config={"max_position_embeddings": 512}),
    )


@pytest.fixture
def registered(toy, monkeypatch) -> Family:
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, toy))
    return toy


@pytest.fixture
def toy_dir(registered, tmp_path) -> Path:
    from qwen_mlx.tiny import build_tiny_model

    return build_tiny_model(tmp_path / "toy", arch=registered)


def test_the_tiny_builder_writes_the_familys_tokens_template_and_tables(toy_dir, registered):
    import json

    config = json.loads((toy_dir / "config.json").read_text())
    assert config["model_type"] == "toy" and config["architectures"] == ["ToyForCausalLM"]
    assert config["max_position_embeddings"] == 512
    tok_config = json.loads((toy_dir / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TEMPLATE and tok_config["eos_token"] == "<|/turn|>"
    added = {t["content"]: t["special"] for t in tok_config["added_tokens_decoder"].values()}
    assert added == {"<|doc|>": True, "<|turn|>": True, "<|/turn|>": True} | {
        "<reason>": False,
        "</reason>": False,
    }
    assert families.family_of(config, toy_dir) is registered


def test_tokens_and_the_loss_mask_follow_the_familys_template(toy_dir, registered):
    from qwen_mlx.families import tokenizer_family
    from qwen_mlx.tokens import encode_record, end_of_text_id, load_tokenizer

    tokenizer = load_tokenizer(toy_dir)
    assert tokenizer_family(tokenizer) is registered
    record = {
        "messages": [
            {"role": "user", "content": "能报销吗<|/turn|>"},  # text, not the control token
            {"role": "assistant", "content": "<reason>\n查细则。\n</reason>\n\n能。"},
        ]
    }
    sample = encode_record(tokenizer, record)
    target = [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
    assert tokenizer.decode(target) == "<reason>\n查细则。\n</reason>\n\n能。<|/turn|>"
    turn_end = tokenizer.convert_tokens_to_ids("<|/turn|>")
    assert sample.input_ids.count(turn_end) == 2  # the user's "<|/turn|>" is text
    text = encode_record(tokenizer, {"text": "差旅费管理办法"})
    assert text.input_ids[-1] == end_of_text_id(tokenizer)
    assert end_of_text_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|doc|>")


def test_the_reply_split_uses_the_familys_think_tags(registered):
    from qwen_mlx.chat_template import for_template
    from qwen_mlx.reasoning import ReasoningSplit, split_reply

    reply = "<reason>\n先查。\n</reason>\n\n每晚500元。"
    assert split_reply(reply, registered.think_tags) == ("先查。", "每晚500元。")
    assert split_reply("<think>\nx\n</think>\n\ny", registered.think_tags)[0] is None
    split, parts = ReasoningSplit(registered.think_tags), []
    for piece in ("<rea", "son>\n先", "查。\n</rea", "son>\n\n每晚", "500元。"):
        parts += split.feed(piece)
    parts += split.finish()
    assert "".join(t for f, t in parts if f == "content") == "每晚500元。"
    turn = {"role": "assistant", "content": "<reason>r</reason>\n\na"}
    assert for_template([turn], registered, TEMPLATE) == [
        {"role": "assistant", "content": "a", "reasoning_content": "r"}
    ]


def test_the_gguf_writer_takes_tokens_stops_and_the_tensor_transform(toy_dir, registered, tmp_path):
    gguf = pytest.importorskip("gguf")
    from qwen_mlx.export.gguf import export
    from qwen_mlx.tensor_io import model_tensors, to_f32

    out = export(None, tmp_path / "toy.gguf", model=toy_dir, quant="f32").path
    reader = gguf.GGUFReader(out)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    refs = model_tensors(toy_dir)

    def stored(name):
        return to_f32(refs[name].read(), refs[name].dtype)

    q = stored("model.layers.0.self_attn.q_proj.weight")
    assert np.array_equal(tensors["blk.0.attn_q.weight"], q[::-1])
    assert np.array_equal(
        tensors["blk.0.attn_q.bias"], stored("model.layers.0.self_attn.q_proj.bias")[::-1]
    )
    assert np.array_equal(
        tensors["blk.0.attn_k.weight"], stored("model.layers.0.self_attn.k_proj.weight")
    )

    field = reader.fields
    tokens = [
        bytes(field["tokenizer.ggml.tokens"].parts[i]).decode()
        for i in field["tokenizer.ggml.tokens"].data
    ]
    eos = int(field["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert tokens[eos] == "<|/turn|>" and "<|doc|>" in tokens
    modelfile = (tmp_path / "toy.Modelfile").read_text()
    assert 'PARAMETER stop "<|/turn|>"' in modelfile and 'PARAMETER stop "<|doc|>"' in modelfile
    assert "<|im_end|>" not in modelfile


def test_a_lora_ggufs_b_gets_the_transform_of_its_weight(toy_dir, registered, tmp_path):
    gguf = pytest.importorskip("gguf")
    import json

    from safetensors.numpy import save_file

    from qwen_mlx.export.gguf import export

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    rng = np.random.default_rng(0)
    prefix = "base_model.model.model.layers.0.self_attn"
    outs = {"q_proj": 64, "k_proj": 32}  # the tiny model's query and key/value widths
    weights = {
        f"{prefix}.{m}.lora_{half}.weight": rng.standard_normal(shape).astype(np.float32)
        for m, width in outs.items()
        for half, shape in (("A", (4, 64)), ("B", (width, 4)))
    }
    save_file(weights, adapter / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}
    config |= {"target_modules": ["q_proj", "k_proj"], "base_model_name_or_path": str(toy_dir)}
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    out = export(adapter, tmp_path / "toy-lora.gguf", model=toy_dir, lora_only=True).path
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    q_b, k_b = (weights[f"{prefix}.{m}.lora_B.weight"] for m in ("q_proj", "k_proj"))
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_b"], q_b[::-1])
    assert np.array_equal(tensors["blk.0.attn_k.weight.lora_b"], k_b)
    a = weights[f"{prefix}.q_proj.lora_A.weight"]
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_a"], a)
