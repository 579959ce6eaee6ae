"""The tiny offline model must look and behave like a downloaded Qwen2.5-Instruct folder.

Every other test (training on both backends, fuse, GGUF export, serve) runs on this folder,
so here we check that transformers and mlx-lm both load it through their normal code, agree
on its logits, and that its tokenizer and chat template behave like Qwen2.5's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_mlx.errors import UserError
from qwen_mlx.families import QWEN2
from qwen_mlx.tensor_io import f32_to_bf16
from qwen_mlx.tiny import build_tiny_model, init_weights

REPO_ROOT = Path(__file__).resolve().parent.parent
QWEN2_SPLIT = QWEN2.split_pattern
DEFAULT_SYSTEM = QWEN2.default_system_prompt
MIXED_TEXTS = [
    "报销细则第3条：住宿费每晚不超过500元。",
    "Hello, world! It's 2024-06-30; total = 1,234.50 CNY (约￥1234.5)",
    "  leading spaces,\ttabs\r\nand CRLF\n\n混合 mixed 文本 text 42\n",
    "emoji 🚀 and rare 龘 characters are byte-encoded",
]
SPECIALS = list(QWEN2.special_tokens)
TINY_SHAPES = {"vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128}


def _config(model_dir: Path, name: str = "config.json") -> dict:
    return json.loads((model_dir / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- folder and weights


def test_folder_has_the_files_and_config_of_a_qwen2_5_instruct_download(tiny_model_dir):
    from qwen_mlx.outputs import OUTPUT_MARK

    # Besides the marker that lets a rerun of tiny-model replace its own output.
    names = {p.name for p in tiny_model_dir.iterdir()} - {OUTPUT_MARK}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    }
    cfg = _config(tiny_model_dir)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_theta"] == 1000000.0
    assert cfg["use_sliding_window"] is False
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0


def test_safetensors_has_qwen2_names_shapes_bf16_and_nontrivial_biases(tiny_model_dir):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    cfg = _config(tiny_model_dir)
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    assert shapes == QWEN2.tensor_shapes(cfg)  # no lm_head: tied to the embeddings
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # GGUF/fuse tests rely on biases and norms that change the output if dropped.
    for name, t in tensors.items():
        if name.endswith(".bias"):
            assert t.float().abs().mean() > 0.03, name
        if "norm" in name:
            assert (t.float() - 1).abs().mean() > 0.03, name


def test_weights_are_stored_exactly_as_initialized_in_both_dtypes(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    f32_dir = build_tiny_model(tmp_path / "f32", dtype="float32")
    bf16_dir = build_tiny_model(tmp_path / "bf16")
    cfg = _config(f32_dir)
    assert cfg["torch_dtype"] == "float32"
    expected = init_weights(np.random.default_rng(0), cfg)
    f32 = load_file(f32_dir / "model.safetensors")
    bf16 = load_torch(bf16_dir / "model.safetensors")
    assert f32.keys() == bf16.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(f32[name], value, err_msg=name)
        bits = bf16[name].view(torch.int16).numpy()
        np.testing.assert_array_equal(bits, f32_to_bf16(value).view(np.int16), err_msg=name)


def test_transformers_loads_a_tied_bf16_qwen2_that_runs(tiny_model_dir, tiny_tokenizer):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="auto")
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    upcast = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert torch.equal(upcast.model.norm.weight, model.model.norm.weight.float())
    ids = torch.tensor([tiny_tokenizer.encode(MIXED_TEXTS[0] + MIXED_TEXTS[1])])
    with torch.no_grad():
        logits = upcast(ids).logits
    assert logits.shape == (1, ids.shape[1], _config(tiny_model_dir)["vocab_size"])
    assert torch.isfinite(logits).all()
    assert logits.std() > 0  # random weights, not a degenerate constant output


def test_mlx_lm_loads_the_same_folder_and_matches_transformers_logits(family_model_dir):
    # Every family's tiny model, through each library's own code for that architecture.
    pytest.importorskip("mlx_lm")
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    from mlx_lm.utils import load
    from transformers import AutoModelForCausalLM

    config = json.loads((family_model_dir / "config.json").read_text())
    mlx_model, mlx_tokenizer = load(str(family_model_dir))
    assert type(mlx_model).__module__ == f"mlx_lm.models.{config['model_type']}"
    mlx_model.set_dtype(mx.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(family_model_dir, dtype=torch.float32)
    assert type(hf_model).__name__ == config["architectures"][0]
    ids = mlx_tokenizer.encode("".join(MIXED_TEXTS[:2]))
    mlx_logits = np.array(mlx_model(mx.array([ids])))
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids])).logits.numpy()
    assert mlx_logits.shape == hf_logits.shape
    np.testing.assert_allclose(mlx_logits, hf_logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- tokenizer


def test_vocab_size_is_padded_above_the_tokenizer_to_a_multiple_of_64(
    tiny_model_dir, tiny_tokenizer
):
    vocab = _config(tiny_model_dir)["vocab_size"]
    assert vocab % 64 == 0
    assert vocab > len(tiny_tokenizer)  # unused embedding rows, as in Qwen2.5 (151936 > 151665)
    assert len(tiny_tokenizer) <= 2048


def test_tokenizer_round_trips_chinese_english_and_digits(tiny_model_dir, tiny_tokenizer):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for text in MIXED_TEXTS:
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        assert tiny_tokenizer.decode(ids) == text
        # transformers 5 rebuilds Qwen2Tokenizer from vocab+merges with its own pipeline;
        # it must give the same ids as tokenizer.json itself (what llama.cpp reads).
        assert ids == raw.encode(text, add_special_tokens=False).ids
    digits = tiny_tokenizer.tokenize("12345")
    assert len(digits) == 5  # Qwen2 splits numbers into single digits


def test_special_tokens_are_single_ids_matching_the_configs(tiny_model_dir, tiny_tokenizer):
    ids = {tok: tiny_tokenizer.encode(tok, add_special_tokens=False) for tok in SPECIALS}
    assert ids and all(len(v) == 1 for v in ids.values()), ids
    endoftext, im_start, im_end = (ids[tok][0] for tok in SPECIALS)
    assert (im_start, im_end) == (endoftext + 1, endoftext + 2)  # Qwen's order
    cfg, gen = _config(tiny_model_dir), _config(tiny_model_dir, "generation_config.json")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (endoftext, im_end)
    assert gen["eos_token_id"] == [im_end, endoftext]
    assert gen["pad_token_id"] == endoftext
    assert tiny_tokenizer.eos_token_id == im_end
    assert tiny_tokenizer.pad_token_id == endoftext
    assert tiny_tokenizer.bos_token is None
    # Special tokens inside ordinary text stay whole, so a rendered chat keeps its structure.
    chat = tiny_tokenizer.encode("<|im_start|>user\n你好<|im_end|>\n", add_special_tokens=False)
    assert chat[0] == im_start
    assert chat.count(im_end) == 1


def test_tokenizer_json_has_qwen2_structure(tiny_model_dir):
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] == {"type": "NFC"}
    assert spec["pre_tokenizer"] == {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": QWEN2_SPLIT},
                "behavior": "Isolated",
                "invert": False,
            },
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": False,
            },
        ],
    }
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["post_processor"]["type"] == "ByteLevel"
    assert spec["post_processor"]["trim_offsets"] is False
    model = spec["model"]
    assert (model["type"], model["unk_token"], model["byte_fallback"]) == ("BPE", None, False)
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(model["vocab"])  # any byte encodes
    added = [(t["id"], t["content"], t["special"], t["normalized"]) for t in spec["added_tokens"]]
    n = len(model["vocab"])
    assert added == [(n + i, tok, True, False) for i, tok in enumerate(SPECIALS)]


def test_tokenizer_config_is_qwen2_5_instruct_style(tiny_model_dir):
    tc = _config(tiny_model_dir, "tokenizer_config.json")
    assert tc["tokenizer_class"] == "Qwen2Tokenizer"
    assert tc["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == (
        None,
        "<|im_end|>",
        "<|endoftext|>",
        None,
    )
    template = REPO_ROOT / "qwen_mlx" / "templates" / "qwen2_5_chat_template.jinja"
    assert tc["chat_template"] == template.read_text(encoding="utf-8")


# ---------------------------------------------------------------- chat template


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_inserts_the_default_system_prompt(tiny_tokenizer):
    text = _render(tiny_tokenizer, [{"role": "user", "content": "差旅费怎么报销？"}])
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\n差旅费怎么报销？<|im_end|>\n"
    )


def test_chat_template_keeps_a_given_system_prompt_and_adds_generation_prompt(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "你是财务助手。"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "住宿标准？"},
    ]
    text = _render(tiny_tokenizer, messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\n你是财务助手。<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n你好！<|im_end|>\n"
        "<|im_start|>user\n住宿标准？<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_renders_tools_calls_and_grouped_responses(tiny_tokenizer):
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
    messages = [
        {"role": "user", "content": "天气？"},
        {"role": "assistant", "content": "", "tool_calls": [call, call]},
        {"role": "tool", "content": '{"temp": 20}'},
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    text = _render(tiny_tokenizer, messages, tools=[tool], add_generation_prompt=True)
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{json.dumps(tool, ensure_ascii=False)}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n天气？<|im_end|>\n"
        f"<|im_start|>assistant\n{call_text}\n{call_text}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n"
        '{"temp": 20}\n</tool_response>\n<tool_response>\n{"temp": 21}\n</tool_response>'
        "<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------- determinism and data


def _file_bytes(model_dir: Path) -> dict[str, bytes]:
    """The model's files (not our output record: it holds their modification times)."""
    from qwen_mlx.outputs import OUTPUT_MARK

    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.name != OUTPUT_MARK}


def test_builds_are_byte_identical_across_processes(tmp_path):
    first = build_tiny_model(tmp_path / "a")
    # A second interpreter gets fresh hash seeds, so any order-dependent training shows up.
    code = f"from qwen_mlx.tiny import build_tiny_model; build_tiny_model({str(tmp_path / 'b')!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)
    assert _file_bytes(first) == _file_bytes(tmp_path / "b")
    reseeded = build_tiny_model(tmp_path / "c", seed=1)
    assert (reseeded / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert (reseeded / "model.safetensors").read_bytes() != (
        first / "model.safetensors"
    ).read_bytes()


def test_tokenizer_learns_from_every_string_in_the_data_file(tmp_path):
    from tokenizers import Tokenizer

    word = "Zorblaxian"
    records = [
        {"instruction": "住宿费标准", "input": "", "output": "按规定执行"},
        {"instruction": "q", "output": "a", "history": [["问", f"{word} {word} {word}"]] * 20},
        {"messages": [{"role": "user", "content": "报销"}, {"role": "assistant", "content": "好"}]},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    data = tmp_path / "data.jsonl"
    # BOM, CRLF and blank lines are what Windows editors and hand edits produce.
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(lines).encode("utf-8") + b"\r\n")
    with_data = build_tiny_model(tmp_path / "with", data_file=data)
    without = build_tiny_model(tmp_path / "without")

    def pieces(model_dir: Path) -> int:
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return len(tok.encode(" " + word, add_special_tokens=False).ids)

    assert pieces(with_data) == 1  # learned from the nested history strings
    assert pieces(without) > 1


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.jsonl", None, "not found"),
        ("bad.jsonl", b'{"instruction": "a"}\n{not json}\n', "line 2"),
        ("list.jsonl", b'["a", "b"]\n', "line 1"),
        ("latin1.jsonl", '{"output": "café"}\n'.encode("latin-1"), "UTF-8"),
        ("empty.jsonl", b"\n\n", "no text"),
        ("folder", "dir", "cannot read"),
    ],
)
def test_bad_data_file_is_a_one_line_user_error(tmp_path, name, content, needle):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "model"
    with pytest.raises(UserError) as err:
        build_tiny_model(out, data_file=path)
    message = str(err.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message
    assert not out.exists()  # nothing half-written


def test_unsupported_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        build_tiny_model(tmp_path / "m", dtype="float16")


def test_tiny_model_never_replaces_a_folder_it_did_not_write(tmp_path):
    """A user's folder is left alone (one line; --force too), a rerun rebuilds."""
    from click.testing import CliRunner

    from qwen_mlx.cli import cli

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "budget.xlsx").write_text("keep me")
    for extra in ([], ["--force"]):
        refused = CliRunner().invoke(cli, ["tiny-model", str(mine), *extra])
        assert refused.exit_code != 0 and "budget.xlsx" in refused.output
    assert (mine / "budget.xlsx").read_text() == "keep me"

    built = tmp_path / "tiny"
    for _ in range(2):  # the second run replaces its own earlier output
        assert CliRunner().invoke(cli, ["tiny-model", str(built)]).exit_code == 0
    assert (built / "config.json").is_file()
