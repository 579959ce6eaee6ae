"""``qwen-mlx export``: our GGUF files run in llama.cpp exactly like the model in transformers,
for every model family (each family's tiny model: Qwen2's, Qwen3's with q/k norms, no q/k/v
bias, ``head_dim`` twice hidden/heads and ``<think>`` tokens).

Every check goes through llama.cpp itself (llama-cpp-python): it must split text into the
same tokens as the Hugging Face tokenizer, compute the same logits (f16), nearly the same
greedy choices (q8_0), apply an adapter the same way fused or as a LoRA GGUF, stop a chat
answer at the family's turn end after the opening the model was tuned with (thinking off
unless the run says chat.enable_thinking), and load q4_k_m, whose streamed tensors must equal
llama.cpp's own quantizer's byte for byte. Plus the Modelfile and the error paths. Tensors
identical to llama.cpp's own converter: bench/export.py --arch.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from jinja2 import Template
from lora_helpers import (
    MIXED_TEXT,
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
from qwen_mlx.errors import UserError
from qwen_mlx.export import gguf_tensors
from qwen_mlx.export.gguf import export
from qwen_mlx.outputs import OUTPUT_MARK

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

TOL = 1e-2  # max |logit difference| accepted for f16 (the bar)
QUESTION, ANSWER = "出差住宿费标准是多少？", "每人每天不超过500元。"
# What a user's prompt holds: Chinese, English, digits, control tokens and Qwen3's think tags.
THINK_TEXT = (
    "<|im_start|>user\n报销细则第3条：住宿费每晚不超过500元吗？Is it 1,234.50 CNY?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n先看第3条。\n</think>\n\n不超过500元。<|im_end|>\n"
)


def _arch(family) -> str:
    """The architecture name llama.cpp knows the family's GGUF files by."""
    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.gguf_arch]]


def _prompt(tokenizer, **options) -> str:
    """QUESTION as a prompt, rendered by the model's own template with ``options``."""
    turn = [{"role": "user", "content": QUESTION}]
    return tokenizer.apply_chat_template(
        turn, tokenize=False, add_generation_prompt=True, **options
    )


@pytest.fixture(scope="module")
def ids(family_tokenizer) -> list[int]:
    return family_tokenizer(MIXED_TEXT)["input_ids"]


@pytest.fixture(scope="module")
def work(family, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(f"gguf-{family.name}")


@pytest.fixture(scope="module")
def adapter(family_model_dir, work) -> Path:
    return make_peft_adapter(family_model_dir, work / "adapter")


@pytest.fixture(scope="module")
def run(family_model_dir, adapter, work) -> Path:
    return make_run(work / "run", family_model_dir, adapter, "data.system_prompt=你是报销助手。")


@pytest.fixture(scope="module")
def f16(family_model_dir, work) -> Path:
    return export(None, work / "base" / "tiny-f16.gguf", model=family_model_dir).path


@pytest.fixture(scope="module")
def f32(family_model_dir, work) -> Path:
    return export(None, work / "base" / "tiny-f32.gguf", model=family_model_dir, quant="f32").path


@pytest.fixture(scope="module")
def fused_f16(run, work) -> Path:
    return export(run, work / "fused" / "run-f16.gguf").path


@pytest.fixture(scope="module")
def chat_model(family_model_dir, family_tokenizer, work) -> Path:
    """The tiny model fine-tuned to answer QUESTION with ANSWER and close its turn, in the
    form ``train`` renders a record without reasoning (after Qwen3's empty think block)."""
    out = work / "chat-model"
    options = {"enable_thinking": False}  # a template without a think block ignores it
    return fine_tune_answer(family_model_dir, family_tokenizer, QUESTION, ANSWER, out, **options)


# ---------------------------------------------------------------- tokenizer and metadata


def test_llama_cpp_tokenizes_exactly_like_hugging_face(family, f16, family_tokenizer):
    texts = (
        MIXED_TEXT,
        THINK_TEXT,
        "  spaces\ttabs\r\n\n混合 mixed 3.14159 1,234 年月日 龘 😶\u200d🌫️",
        "I'm 'RE",
    )
    check_llama_tokenizes_like(f16, family_tokenizer, texts, family.turn_end)
    # A text token (Qwen3's <think>) is one id wherever it is written.
    llm = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    try:
        for token in family.text_tokens:
            token_id = family_tokenizer.convert_tokens_to_ids(token)
            assert family_tokenizer(token)["input_ids"] == [token_id]
            written = f"a{token}b".encode()
            assert llm.tokenize(written, add_bos=False, special=True)[1:-1] == [token_id]
    finally:
        llm.close()


def test_metadata_is_what_llama_cpp_and_ollama_need(
    family, f16, family_model_dir, family_tokenizer
):
    fields = gguf_fields(f16)
    config = json.loads((family_model_dir / "config.json").read_text())
    arch, token_id = _arch(family), family_tokenizer.convert_tokens_to_ids
    expected = {
        "general.architecture": arch,
        "general.type": "model",
        "general.file_type": 1,
        f"{arch}.block_count": 2,
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.rope.freq_base": 1e6,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.eos_token_id": token_id(family.turn_end),
        "tokenizer.ggml.padding_token_id": token_id(family.document_end),
    }
    if "head_dim" in config:  # Qwen3's: twice hidden/heads in the tiny model
        head_dim = config["head_dim"]
        assert head_dim != config["hidden_size"] // config["num_attention_heads"]
        # llama.cpp would otherwise take hidden/heads: the wrong width for every head.
        expected[f"{arch}.attention.key_length"] = head_dim
        expected[f"{arch}.attention.value_length"] = head_dim
    assert {key: fields.get(key) for key in expected} == expected
    # The model's own template; a thinking family's defaults to enable_thinking=False (see
    # the chat test below), others' is the same text.
    template = fields["tokenizer.chat_template"]
    assert template.endswith(family_tokenizer.chat_template)
    assert (template == family_tokenizer.chat_template) is not family.thinks
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config["vocab_size"]  # padded to the embedding rows
    assert tokens[-1] == f"[PAD{config['vocab_size'] - 1}]" and types[-1] == 5  # UNUSED
    assert types[token_id(family.turn_end)] == 3  # CONTROL
    assert len(fields["tokenizer.ggml.merges"]) > 1000

    types = gguf_types(f16)
    shapes = family.tensor_shapes(config)
    assert len(types) == len(shapes) and "output.weight" not in types  # tied: no output
    assert sum(n.endswith(".bias") for n in types) == sum(n.endswith(".bias") for n in shapes)
    qk_norms = [n for n in types if n.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))]
    assert len(qk_norms) == sum(n.endswith(("q_norm.weight", "k_norm.weight")) for n in shapes)
    assert {types[n] for n in types if n.endswith(("_norm.weight", ".bias"))} == {"F32"}
    assert {types[n] for n in types if n.endswith("proj.weight") or "attn_q" in n} <= {"F16", "F32"}
    assert types["token_embd.weight"] == types["blk.0.ffn_down.weight"] == "F16"


def test_rope_settings_follow_the_config(family, family_model_dir, tmp_path):
    model = tmp_path / "long"
    shutil.copytree(family_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    del config["rope_theta"]  # transformers 5 style, with Qwen2.5's long-context recipe
    config["rope_parameters"] = {
        "rope_theta": 5e5,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    (model / "config.json").write_text(json.dumps(config))
    fields = gguf_fields(export(None, tmp_path / "long.gguf", model=model).path)
    arch = _arch(family)
    assert fields[f"{arch}.rope.freq_base"] == 5e5
    assert fields[f"{arch}.rope.scaling.type"] == "yarn"
    assert fields[f"{arch}.rope.scaling.factor"] == 4.0
    assert fields[f"{arch}.rope.scaling.original_context_length"] == 32768


def _untied_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir`` with its own lm_head, as Qwen2.5-7B and larger ship (untied), and stored
    as float32 (so an f32 checkpoint is covered too)."""
    from qwen_mlx.tensor_io import model_tensors, save_f32

    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {name: ref.read_f32() for name, ref in model_tensors(model_dir).items()}
    shape = tensors["model.embed_tokens.weight"].shape
    tensors["lm_head.weight"] = 0.05 * np.random.default_rng(1).standard_normal(shape, np.float32)
    save_f32(out / "model.safetensors", tensors)
    config = json.loads((out / "config.json").read_text())
    config |= {"tie_word_embeddings": False, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_untied_model_gets_its_output_matrix(family, family_model_dir, ids, tmp_path):
    model = _untied_copy(family_model_dir, tmp_path / "untied")
    path = export(None, tmp_path / "untied.gguf", model=model, quant="q4_0").path
    types = gguf_types(path)
    config = json.loads((model / "config.json").read_text())
    assert len(types) == len(family.tensor_shapes(config)) and "output.weight" in types
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    f16 = export(None, tmp_path / "untied-f16.gguf", model=model).path
    assert np.abs(llama_logits(f16, ids) - hf_logits(model, ids)).max() <= TOL


# ---------------------------------------------------------------- numbers in llama.cpp


@pytest.mark.parametrize(("quant", "tol"), [("f16", TOL), ("f32", 1e-4)])
def test_logits_match_transformers(quant, tol, f16, f32, family_model_dir, family_tokenizer):
    # f32 (library only) shows the file is exact; f16 is what users get, within the bar. On a
    # prompt and on a reply with a think block (Qwen3's text tokens through the model).
    path = {"f16": f16, "f32": f32}[quant]
    for text in (MIXED_TEXT, THINK_TEXT):
        ids = family_tokenizer(text)["input_ids"]
        assert np.abs(llama_logits(path, ids) - hf_logits(family_model_dir, ids)).max() <= tol


@pytest.mark.parametrize(("quant", "tol"), [("f16", TOL), ("f32", 1e-4)])
def test_fused_export_matches_transformers_with_peft(
    quant, tol, fused_f16, f16, family_model_dir, run, ids, tmp_path
):
    path = fused_f16 if quant == "f16" else export(run, tmp_path / "f32.gguf", quant="f32").path
    expected = hf_logits(family_model_dir, ids, run / "adapter")
    plain = hf_logits(family_model_dir, ids)
    error = np.abs(llama_logits(path, ids) - expected).max()
    assert np.abs(plain - expected).max() > 0.1  # the adapter matters
    if quant == "f16":
        # In f16 (weights and, in llama.cpp's CPU matmuls, activations rounded) the adapter
        # adds no error of its own: within the f16 bar, or within twice what f16 costs the
        # base model itself where that is more (Qwen3's tiny model: 0.0107 against 0.0075).
        tol = max(tol, 2 * np.abs(llama_logits(f16, ids) - plain).max())
    assert error <= tol


@pytest.mark.parametrize("kind", ["plain", "rslora"])
def test_lora_gguf_in_llama_cpp_matches_the_fused_model(
    kind, family, f16, f32, family_model_dir, ids, tmp_path
):
    extra = {"use_rslora": True, "alpha_pattern": {"v_proj": 4}} if kind == "rslora" else {}
    adapter = make_peft_adapter(family_model_dir, tmp_path / "adapter", rank=4, alpha=8, **extra)
    # From a run folder and from a bare adapter folder: both find their base.
    source = make_run(tmp_path / "run", family_model_dir, adapter) if kind == "plain" else adapter
    lora = export(source, tmp_path / "lora.gguf", lora_only=True).path
    fields = gguf_fields(lora)
    assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
    assert fields["general.architecture"] == _arch(family)
    assert gguf_types(lora)["blk.0.attn_q.weight.lora_a"] == "F32"
    peft = hf_logits(family_model_dir, ids, adapter)

    # Exact in float32: base GGUF + LoRA GGUF == fused GGUF == transformers + PEFT.
    fused32 = export(source, tmp_path / "fused32.gguf", quant="f32").path
    with_lora = llama_logits(f32, ids, lora=lora)
    # llama-cpp-python does not raise when an adapter fails to apply: compare with the base.
    assert np.abs(with_lora - llama_logits(f32, ids)).max() > 0.1
    assert np.abs(with_lora - llama_logits(fused32, ids)).max() <= 1e-4
    assert np.abs(with_lora - peft).max() <= 1e-4
    # On the f16 base users run, within the same bar as the f16 export, and within twice what
    # f16 costs the base model itself.
    error = np.abs(llama_logits(f16, ids, lora=lora) - peft).max()
    f16_cost = np.abs(llama_logits(f16, ids) - hf_logits(family_model_dir, ids)).max()
    assert error <= TOL and error <= 2 * f16_cost


# ---------------------------------------------------------------- chat and q4_k_m


@pytest.mark.parametrize(("quant", "agree"), [("q8_0", 0.95), ("q4_0", 0.9), ("bf16", 0.99)])
def test_quantized_greedy_choices_agree(quant, agree, chat_model, ids, tmp_path):
    # On the trained model: the random one's logits are near-ties (top-2 gaps under 0.02 at
    # ~6% of positions), where argmax agreement would measure noise, not the export.
    path = export(None, tmp_path / f"{quant}.gguf", model=chat_model, quant=quant).path
    expected = hf_logits(chat_model, ids).argmax(-1)
    assert (llama_logits(path, ids).argmax(-1) == expected).mean() >= agree
    assert gguf_fields(path)["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]


def test_greedy_chat_answer_stops_at_the_turn_end(family, chat_model, family_tokenizer, tmp_path):
    path = export(None, tmp_path / "chat.gguf", model=chat_model).path
    turn_end = family_tokenizer.convert_tokens_to_ids(family.turn_end)
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    try:
        assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), turn_end)
        # The GGUF's own chat template builds the prompt (llama.cpp's chat, LM Studio's and
        # llama-server's pass no enable_thinking: the export makes it default to off, as the
        # model was tuned); greedy decoding, no stop strings.
        chat = llm.create_chat_completion(
            [{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=40
        )
        assert chat["choices"][0]["message"]["content"] == ANSWER
        assert chat["choices"][0]["finish_reason"] == "stop"
        # Raw completion (after Qwen3's empty think block): llama.cpp itself ends generation
        # on the sampled turn end.
        prompt = _prompt(family_tokenizer, enable_thinking=False)
        done = llm.create_completion(prompt, temperature=0.0, max_tokens=40, stop=[])
        assert done["choices"][0]["text"] == ANSWER
        assert done["choices"][0]["finish_reason"] == "stop"
        assert done["usage"]["completion_tokens"] < 40
    finally:
        llm.close()
    template = gguf_fields(path)["tokenizer.chat_template"]
    turn = [{"role": "user", "content": QUESTION}]
    for thinking in (False, True):  # said explicitly, it is obeyed
        prompt = Template(template).render(
            messages=turn, add_generation_prompt=True, enable_thinking=thinking
        )
        assert prompt == _prompt(family_tokenizer, enable_thinking=thinking)


def test_q4_k_m_runs_and_loads(family, tmp_path):
    from qwen_mlx.tiny import build_tiny_model

    # Rows of 256 let llama.cpp use real K-quants (narrower ones fall back to Q5_0/Q8_0).
    wide = {"hidden_size": 256, "intermediate_size": 512, "arch": family.name}
    model = build_tiny_model(tmp_path / "wide", **wide)
    result = export(None, tmp_path / "wide-q4_k_m.gguf", model=model, quant="q4_k_m")
    types = set(gguf_types(result.path).values())
    assert {"Q4_K", "Q6_K"} <= types and "F32" in types
    fields = gguf_fields(result.path)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert fields["general.architecture"] == _arch(family)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [OUTPUT_MARK, "wide", "wide-q4_k_m.Modelfile", "wide-q4_k_m.gguf"]
    llm = llama_cpp.Llama(str(result.path), n_ctx=64, verbose=False)
    try:
        assert len(llm.create_completion("<|im_start|>user\n", max_tokens=4)["choices"]) == 1
    finally:
        llm.close()


def test_q4_k_m_fallback_is_reported(tiny_model_dir, tmp_path):
    result = export(None, tmp_path / "tiny-q4_k_m.gguf", model=tiny_model_dir, quant="q4_k_m")
    assert any("fallback" in note for note in result.notes)


def _llama_quantize(src: Path, dst: Path) -> None:
    """llama.cpp's own quantizer (llama-quantize's code, no imatrix) on a 16-bit GGUF: Q4_K_M."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    finally:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
    assert status == 0


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {
        t.name: (t.tensor_type.name, t.data.view(np.uint8).tobytes())
        for t in gguf.GGUFReader(path).tensors
    }


# (width, ffn width, layers, dtype): real K-quants over 16 layers (Q6_K on attn_v/ffn_down of
# llama.cpp's "more bits" layers), rows of 64 (Q5_0/Q8_0 fallbacks), rows of 272 (F16), a
# float32 checkpoint (quantized from f16, as llama.cpp's converter writes it).
_Q4_K_M_CASES = {
    "wide": (256, 512, 16, "bfloat16"),
    "narrow": (64, 128, 2, "bfloat16"),
    "odd": (272, 544, 3, "bfloat16"),
    "f32": (256, 512, 3, "float32"),
    # llama.cpp calls an 80-layer qwen2 "70B" and gives its other attn_v Q5_K (not qwen3's)
    "80-layers": (256, 512, 80, "bfloat16"),
}


@pytest.mark.parametrize("case", [*_Q4_K_M_CASES, "untied", "fused"])
def test_q4_k_m_tensors_equal_llama_quantizes(family, case, tmp_path):
    """The streamed q4_k_m file has every tensor, type and byte of llama.cpp's quantizer run
    on the 16-bit GGUF (bf16 for a bf16 model, else f16) that used to be written first."""
    from qwen_mlx.adapters import resolve_source
    from qwen_mlx.export.gguf import write_model_gguf
    from qwen_mlx.tensor_io import model_tensors
    from qwen_mlx.tiny import build_tiny_model

    hidden, ffn, layers, dtype = _Q4_K_M_CASES.get(case, _Q4_K_M_CASES["wide"])
    model = build_tiny_model(
        tmp_path / "m",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        dtype=dtype,
        arch=family.name,
    )
    source, target = (None, model)
    if case == "untied":
        model = target = _untied_copy(model, tmp_path / "untied")
    if case == "fused":
        source, target = make_peft_adapter(model, tmp_path / "adapter"), None
    ours = export(source, tmp_path / "out" / "q.gguf", model=target, quant="q4_k_m").path
    resolved = resolve_source(source, target)
    sixteen = gguf_tensors.intermediate_quant(model_tensors(resolved.model_dir))
    write_model_gguf(tmp_path / "16.gguf", resolved, sixteen, "q")
    _llama_quantize(tmp_path / "16.gguf", tmp_path / "reference.gguf")
    mine, reference = _tensors(ours), _tensors(tmp_path / "reference.gguf")
    assert mine.keys() == reference.keys()
    assert {n: t for n, (t, _) in mine.items()} == {n: t for n, (t, _) in reference.items()}
    assert [n for n in mine if mine[n][1] != reference[n][1]] == []
    types = {t for t, _ in mine.values()}
    expected = {"wide": {"Q4_K", "Q6_K"}, "narrow": {"Q5_0", "Q8_0"}, "odd": {"F16"}}
    assert expected.get(case, {"Q4_K", "Q6_K"}) <= types
    if case == "80-layers":
        assert ("Q5_K" in types) == (family.name == "qwen2")


# ---------------------------------------------------------------- command line, Modelfile


def test_cli_writes_modelfile_and_prints_the_ollama_line(family, run, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    result = CliRunner().invoke(cli, ["export", str(run), "-o", str(out), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    assert f"ollama create run -f {out.parent / 'model.Modelfile'}" in result.output
    modelfile = (out.parent / "model.Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert 'SYSTEM """你是报销助手。"""' in modelfile  # the run's data.system_prompt
    assert family.stop_tokens
    for token in family.stop_tokens:
        assert f'PARAMETER stop "{token}"' in modelfile
    # The family's ollama template (rendered as ollama does in test_ollama_template.py).
    assert f'TEMPLATE """{family.ollama_template()}"""' in modelfile


def test_two_exports_in_one_folder_keep_a_modelfile_each(run, family_model_dir, tmp_path):
    export(run, tmp_path / "tuned.gguf")
    export(None, tmp_path / "base.gguf", model=family_model_dir)
    tuned, base = (
        (tmp_path / "tuned.Modelfile").read_text(),
        (tmp_path / "base.Modelfile").read_text(),
    )
    assert tuned.startswith("FROM ./tuned.gguf\n") and "你是报销助手" in tuned
    assert base.startswith("FROM ./base.gguf\n") and "你是报销助手" not in base


def test_modelfile_of_a_plain_model_prompts_and_stops_as_the_family_does(family, f16):
    modelfile = (f16.parent / "tiny-f16.Modelfile").read_text()
    # The family's template's own system prompt (Qwen2's "You are Qwen, …"; Qwen3 has none).
    system = family.default_system_prompt
    assert f'SYSTEM """{system}"""' in modelfile if system else "SYSTEM" not in modelfile
    assert family.stop_tokens
    for token in family.stop_tokens:
        assert f'PARAMETER stop "{token}"' in modelfile
    # How its prompts open, turn by turn, is checked as ollama renders it (test_ollama_template).
    assert f'TEMPLATE """{family.ollama_template()}"""' in modelfile


def test_ollama_option_runs_ollama_create(tiny_model_dir, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ollama"
    record = f"pathlib.Path({str(tmp_path / 'args')!r}).write_text(' '.join(sys.argv[1:]))"
    fake.write_text(f"#!{sys.executable}\nimport sys, pathlib\n{record}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "m" / "tiny.gguf"
    args = ["export", "--model", str(tiny_model_dir), "-o", str(out), "--ollama", "baoxiao"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "args").read_text() == f"create baoxiao -f {(out.parent / 'tiny.Modelfile')}"


def test_ollama_option_without_ollama_fails_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "m" / "tiny.gguf"
    args = ["export", "--model", str(tiny_model_dir), "-o", str(out), "--ollama", "x"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "ollama" in result.output and "PATH" in result.output
    assert not out.parent.exists()


def test_output_replaces_an_earlier_gguf_but_no_other_file(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_model_dir), "-o", str(notes)])
    assert result.exit_code == 1 and "ending in .gguf" in result.output, result.output
    assert notes.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    export(None, tmp_path / "m.gguf", model=tiny_model_dir, quant="q8_0")
    assert export(None, tmp_path / "m.gguf", model=tiny_model_dir).path.stat().st_size > 0


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [("llama", "LlamaForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM")],
)
def test_unsupported_architecture_is_one_clear_line(
    model_type, architecture, tiny_model_dir, tmp_path
):
    model = tmp_path / "other"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": model_type, "architectures": [architecture]}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "x.gguf"
    result = CliRunner().invoke(cli, ["export", "--model", str(model), "-o", str(out)])
    assert result.exit_code == 1
    assert architecture in result.output and "Qwen2" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.parent.exists()  # -o's folder is made only for a model we can export


def test_q4_k_m_without_llama_cpp_names_the_extra(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UserError, match=r"qwen-mlx\[gguf\]"):
        export(None, tmp_path / "x.gguf", model=tiny_model_dir, quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_lora_only_needs_an_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="run or adapter"):
        export(None, tmp_path / "x.gguf", model=tiny_model_dir, lora_only=True)


def test_failed_export_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch):
    def broken(jobs, pool=None, **options):
        raise OSError("disk full")
        yield

    monkeypatch.setattr(gguf_tensors, "encoded_stream", broken)
    with pytest.raises(OSError):
        export(None, tmp_path / "x.gguf", model=tiny_model_dir)
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_stop_the_export_with_one_clear_error(tiny_model_dir, tmp_path):
    # The blocks are read by worker threads: the error must still reach the user as one
    # line, with every worker stopped and nothing left behind.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 4096)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="truncated; download the model again"):
        export(None, out / "x.gguf", model=model)
    assert list(out.iterdir()) == []


def test_q4_k_m_refuses_weights_that_quantize_to_inf():
    # llama-quantize validates each quantized chunk and stops; so does the streamed export.
    from qwen_mlx.export.llama_quant import ggml_quantize

    rows = np.ones((2, 256), dtype=np.float32)
    assert ggml_quantize(rows, gguf.GGMLQuantizationType.Q4_K).shape == (2, 144)
    rows[1, 7] = np.inf
    with pytest.raises(UserError, match="inf or NaN"):
        ggml_quantize(rows, gguf.GGMLQuantizationType.Q4_K)
