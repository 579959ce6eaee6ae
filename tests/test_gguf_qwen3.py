"""``fuse`` and ``export`` on a Qwen3: a ``qwen3`` GGUF that llama.cpp runs like transformers.

The same proofs as for Qwen2 (tests/test_gguf_export.py), on the tiny Qwen3 (q/k norms, no
q/k/v bias, ``head_dim`` twice hidden/heads, ``<think>`` tokens): llama.cpp's tokens and
logits, quantized greedy choices, an adapter fused or as a LoRA GGUF equal to PEFT, the fused
folder equal to PEFT's merge, and a Modelfile and GGUF chat template that prompt the way the
model was trained (thinking off unless the run says chat.enable_thinking: an empty think block
opens every reply). Tensors identical to llama.cpp's own converter: bench/export.py --arch qwen3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from jinja2 import Template
from lora_helpers import (
    check_llama_tokenizes_like,
    fine_tune_answer,
    gguf_fields,
    gguf_types,
    hf_logits,
    llama_logits,
    make_peft_adapter,
    make_run,
)

from qwen_mlx.cli import cli
from qwen_mlx.families import QWEN2
from qwen_mlx.fuse import fuse
from qwen_mlx.gguf_export import export
from qwen_mlx.modelfile import modelfile_text
from qwen_mlx.tensor_io import model_tensors

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

TOL = 1e-2  # max |logit difference| accepted for f16, as for Qwen2
QUESTION, ANSWER = "出差住宿费标准是多少？", "每人每天不超过500元。"
# What a user's prompt holds: Chinese, English, digits, control tokens and Qwen3's think tags.
THINK_TEXT = (
    "<|im_start|>user\n报销细则第3条：住宿费每晚不超过500元吗？Is it 1,234.50 CNY?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n先看第3条。\n</think>\n\n不超过500元。<|im_end|>\n"
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-qwen3")


@pytest.fixture(scope="module")
def ids(qwen3_tokenizer) -> list[int]:
    return qwen3_tokenizer(THINK_TEXT)["input_ids"]


@pytest.fixture(scope="module")
def adapter(qwen3_dir, work) -> Path:
    return make_peft_adapter(qwen3_dir, work / "adapter")


@pytest.fixture(scope="module")
def f16(qwen3_dir, work) -> Path:
    return export(None, work / "base" / "qwen3-f16.gguf", model=qwen3_dir).path


@pytest.fixture(scope="module")
def f32(qwen3_dir, work) -> Path:
    return export(None, work / "base" / "qwen3-f32.gguf", model=qwen3_dir, quant="f32").path


@pytest.fixture(scope="module")
def chat_model(qwen3_dir, qwen3_tokenizer, work) -> Path:
    """The tiny Qwen3 tuned in non-thinking form, as ``train`` renders records without
    reasoning: the reply follows the empty think block of enable_thinking=False."""
    out = work / "chat-model"
    return fine_tune_answer(
        qwen3_dir, qwen3_tokenizer, QUESTION, ANSWER, out, enable_thinking=False
    )


# ---------------------------------------------------------------- tokenizer and metadata


def test_llama_cpp_tokenizes_qwen3_text_exactly_like_hugging_face(f16, qwen3_tokenizer):
    texts = (THINK_TEXT, "  spaces\ttabs\r\n\n混合 mixed 3.14159 年月日 😶‍🌫️", "I'm 'RE")
    check_llama_tokenizes_like(f16, qwen3_tokenizer, texts, "<|im_end|>")
    # <think> is an added text token: one id wherever it is written.
    think = qwen3_tokenizer.convert_tokens_to_ids("<think>")
    assert qwen3_tokenizer("<think>")["input_ids"] == [think]
    llm = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(b"a<think>b", add_bos=False, special=True)[1:-1] == [think]
    finally:
        llm.close()


def test_metadata_and_tensors_are_a_qwen3_gguf(f16, qwen3_dir, qwen3_tokenizer):
    config = json.loads((qwen3_dir / "config.json").read_text())
    head_dim = config["head_dim"]
    assert head_dim != config["hidden_size"] // config["num_attention_heads"]
    expected = {
        "general.architecture": "qwen3",
        "qwen3.block_count": 2,
        "qwen3.embedding_length": config["hidden_size"],
        "qwen3.attention.head_count": config["num_attention_heads"],
        "qwen3.attention.head_count_kv": config["num_key_value_heads"],
        # llama.cpp would otherwise take hidden/heads: the wrong width for every head.
        "qwen3.attention.key_length": head_dim,
        "qwen3.attention.value_length": head_dim,
        "qwen3.rope.freq_base": config["rope_theta"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    fields = gguf_fields(f16)
    assert {key: fields.get(key) for key in expected} == expected
    # Qwen3's own template, defaulting to enable_thinking=False (see the chat test below).
    assert fields["tokenizer.chat_template"].endswith(qwen3_tokenizer.chat_template)
    types = gguf_types(f16)
    assert types["blk.1.attn_q_norm.weight"] == types["blk.1.attn_k_norm.weight"] == "F32"
    assert not any(name.endswith(".bias") for name in types)
    assert len(types) == 11 * 2 + 2 and "output.weight" not in types  # tied


# ---------------------------------------------------------------- numbers in llama.cpp


@pytest.mark.parametrize(("quant", "tol"), [("f16", TOL), ("f32", 1e-4)])
def test_qwen3_logits_match_transformers(quant, tol, f16, f32, qwen3_dir, ids):
    path = f16 if quant == "f16" else f32
    assert np.abs(llama_logits(path, ids) - hf_logits(qwen3_dir, ids)).max() <= tol


def test_fused_and_lora_gguf_both_equal_transformers_with_peft(
    qwen3_dir, adapter, f16, f32, ids, work
):
    run = make_run(work / "run", qwen3_dir, adapter)
    peft = hf_logits(qwen3_dir, ids, adapter)
    assert np.abs(hf_logits(qwen3_dir, ids) - peft).max() > 0.1  # the adapter matters
    fused32 = export(run, work / "fused" / "run-f32.gguf", quant="f32").path
    lora = export(run, work / "lora" / "run-lora.gguf", lora_only=True).path
    fields = gguf_fields(lora)
    assert (fields["general.architecture"], fields["adapter.type"]) == ("qwen3", "lora")
    # Exact in float32: fused GGUF == base GGUF + LoRA GGUF == transformers + PEFT.
    assert np.abs(llama_logits(fused32, ids) - peft).max() <= 1e-4
    assert np.abs(llama_logits(f32, ids, lora=lora) - peft).max() <= 1e-4
    # In f16 (weights and, in llama.cpp's CPU matmuls, activations rounded) the adapter adds
    # no error of its own: within twice what f16 costs the base model itself.
    f16_cost = np.abs(llama_logits(f16, ids) - hf_logits(qwen3_dir, ids)).max()
    fused16 = export(run, work / "fused" / "run-f16.gguf").path
    assert np.abs(llama_logits(fused16, ids) - peft).max() <= 2 * f16_cost
    assert np.abs(llama_logits(f16, ids, lora=lora) - peft).max() <= 2 * f16_cost


def test_fused_qwen3_folder_equals_peft_merge(qwen3_dir, adapter, tmp_path):
    out = fuse(adapter, tmp_path / "fused").out_dir
    assert {t.dtype for t in model_tensors(out).values()} == {"BF16"}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    base = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    assert ours.keys() == merged.keys() and any("q_norm" in name for name in ours)
    for name, tensor in merged.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("quant", "agree"), [("q8_0", 0.95), ("q4_0", 0.9), ("bf16", 0.99)])
def test_quantized_qwen3_greedy_choices_agree(quant, agree, chat_model, ids, tmp_path):
    path = export(None, tmp_path / f"{quant}.gguf", model=chat_model, quant=quant).path
    expected = hf_logits(chat_model, ids).argmax(-1)
    assert (llama_logits(path, ids).argmax(-1) == expected).mean() >= agree
    assert gguf_fields(path)["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]


def test_q4_k_m_qwen3_loads_with_k_quants(tmp_path):
    from qwen_mlx.tiny import build_tiny_model

    # Rows of 256 let llama.cpp use real K-quants (narrower ones fall back).
    model = build_tiny_model(
        tmp_path / "wide", hidden_size=256, intermediate_size=512, arch="qwen3"
    )
    path = export(None, tmp_path / "wide-q4_k_m.gguf", model=model, quant="q4_k_m").path
    assert {"Q4_K", "Q6_K"} <= set(gguf_types(path).values())
    assert gguf_fields(path)["general.architecture"] == "qwen3"
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    try:
        assert len(llm.create_completion("<|im_start|>user\n", max_tokens=4)["choices"]) == 1
    finally:
        llm.close()


# ---------------------------------------------------------------- chat and Modelfile


def _prompt(tokenizer, **options) -> str:
    turn = [{"role": "user", "content": QUESTION}]
    return tokenizer.apply_chat_template(
        turn, tokenize=False, add_generation_prompt=True, **options
    )


def test_greedy_answer_after_the_empty_think_block_stops_at_im_end(
    chat_model, qwen3_tokenizer, tmp_path
):
    path = export(None, tmp_path / "chat.gguf", model=chat_model).path
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    try:
        prompt = _prompt(qwen3_tokenizer, enable_thinking=False)
        done = llm.create_completion(prompt, temperature=0.0, max_tokens=40, stop=[])
        assert done["choices"][0]["text"] == ANSWER
        assert done["choices"][0]["finish_reason"] == "stop"
    finally:
        llm.close()


def test_llama_cpp_chat_uses_the_gguf_template_as_training_did(
    chat_model, qwen3_tokenizer, tmp_path
):
    # llama.cpp's chat (and LM Studio's, llama-server's) renders the GGUF's own template and
    # passes no enable_thinking: the export makes it default to off, as the run was tuned.
    path = export(None, tmp_path / "chat.gguf", model=chat_model).path
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    try:
        chat = llm.create_chat_completion(
            [{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=40
        )
        assert chat["choices"][0]["message"]["content"] == ANSWER
        assert chat["choices"][0]["finish_reason"] == "stop"
    finally:
        llm.close()
    template = gguf_fields(path)["tokenizer.chat_template"]
    turn = [{"role": "user", "content": QUESTION}]
    for thinking in (False, True):  # said explicitly, it is obeyed
        prompt = Template(template).render(
            messages=turn, add_generation_prompt=True, enable_thinking=thinking
        )
        assert prompt == _prompt(qwen3_tokenizer, enable_thinking=thinking)


def test_modelfile_opens_replies_as_training_did_and_stops_on_both_tokens(
    qwen3_dir, qwen3_tokenizer, tmp_path
):
    result = CliRunner().invoke(
        cli, ["export", "--model", str(qwen3_dir), "-o", str(tmp_path / "q.gguf")]
    )
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "q.Modelfile").read_text()
    # The generation prompt Qwen3's own template renders with enable_thinking=False, after
    # the user's turn, is how every reply opens: in the chat and the plain-prompt branches.
    user_turn = f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
    opening = _prompt(qwen3_tokenizer, enable_thinking=False).split(user_turn)[1]
    assert opening == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert modelfile.count(opening) == 2
    assert _prompt(qwen3_tokenizer).endswith("<|im_start|>assistant\n")  # thinking on: no block
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "SYSTEM" not in modelfile  # Qwen3's template adds no system prompt of its own


def test_a_run_tuned_to_reason_gets_the_thinking_template(qwen3_dir, adapter, tmp_path):
    # chat.enable_thinking: the model opens its own think block; ollama's think: false (and
    # only that) puts the empty one first. Qwen2 has no think block: its template stays.
    run = make_run(tmp_path / "run", qwen3_dir, adapter, "chat.enable_thinking=true")
    export(run, tmp_path / "thinks.gguf", quant="q8_0")
    modelfile = (tmp_path / "thinks.Modelfile").read_text()
    assert "<|im_start|>assistant\n<think>" not in modelfile
    assert modelfile.count("{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>") == 3
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # The GGUF's own template, rendered without enable_thinking, leaves the block to the model.
    template = gguf_fields(tmp_path / "thinks.gguf")["tokenizer.chat_template"]
    turn = [{"role": "user", "content": QUESTION}]
    prompt = Template(template).render(messages=turn, add_generation_prompt=True)
    assert prompt.endswith(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert modelfile_text("q.gguf", None, QWEN2, True) == modelfile_text(
        "q.gguf", None, QWEN2, False
    )


def test_a_moe_model_is_refused_before_any_folder_is_made(qwen3_dir, tmp_path):
    model = shutil.copytree(qwen3_dir, tmp_path / "moe")
    config = json.loads((model / "config.json").read_text())
    moe = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}
    (model / "config.json").write_text(json.dumps(config | moe))
    out = tmp_path / "out" / "x.gguf"
    result = CliRunner().invoke(cli, ["export", "--model", str(model), "-o", str(out)])
    assert result.exit_code == 1 and "Qwen3MoeForCausalLM" in result.output
    assert not out.parent.exists()  # -o's folder is made only for a model we can export


def test_chat_and_serve_on_a_gguf_prompt_as_its_run_was_tuned(
    qwen3_dir, qwen3_tokenizer, tmp_path, monkeypatch
):
    # `chat --gguf` / `serve --gguf` have no run folder: the GGUF's template, which the export
    # made default to the run's chat.enable_thinking, decides; an explicit setting still wins.
    from qwen_mlx import adapters
    from qwen_mlx.inference import GGUFEngine

    monkeypatch.setattr(adapters.Source, "thinking", property(lambda self: True))
    engine = GGUFEngine(export(None, tmp_path / "thinks.gguf", model=qwen3_dir).path)
    turn = [{"role": "user", "content": QUESTION}]

    def prompt() -> str:
        return engine.llm.detokenize(engine.prompt_ids(turn, 16), special=True).decode()

    assert prompt() == _prompt(qwen3_tokenizer, enable_thinking=True)  # as the run was tuned
    for thinking in (False, True):
        engine.thinking = thinking
        assert prompt() == _prompt(qwen3_tokenizer, enable_thinking=thinking)
