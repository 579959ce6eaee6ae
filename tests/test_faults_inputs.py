"""Broken inputs give one clear line, never a traceback (issue #15, items 12 and 14).

A damaged model folder or a LoRA target that names no layer: ``check`` marks it ✗ with the
fix and exits 1, and ``train`` stops with one ``Error:`` line before loading anything. Data
files the reader libraries choke on: one ``file:line reason`` line each, and a non-zero
exit when nothing in them is usable. (A download server that never answers: test_download.)
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from cli_helpers import one_error_line, settings
from click.testing import CliRunner

from qwen_mlx.cli import cli
from qwen_mlx.config_file import load_config
from qwen_mlx.model_files import check_targets, safetensors_header

TOKENIZER = "tokenizer.json"
SECOND_SHARD = "model-00002-of-00002.safetensors"


# ---------------------------------------------------------------- model folders (item 12)


def garbage_tokenizer(folder):
    (folder / TOKENIZER).write_bytes(random.Random(0).randbytes(4096))


def truncated_tokenizer(folder):
    data = (folder / TOKENIZER).read_bytes()
    (folder / TOKENIZER).write_bytes(data[: len(data) // 2])


def bert_config(folder):
    bert = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768}
    (folder / "config.json").write_text(json.dumps(bert))


def empty_config(folder):
    (folder / "config.json").write_text("{}")


def missing_shard(folder):
    """An index that puts one tensor into a second shard the download never finished."""
    first = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors").rename(folder / first)
    names = sorted(k for k in safetensors_header(folder / first)[0] if k != "__metadata__")
    weight_map = dict.fromkeys(names, first) | {"model.extra.weight": SECOND_SHARD}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_json(folder, name, change):
    path = folder / name
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def layers_as_text(folder):
    edit_json(folder, "config.json", lambda c: c.update(num_hidden_layers="2"))


def vocab_size_mismatch(folder):
    edit_json(folder, "config.json", lambda c: c.update(vocab_size=c["vocab_size"] - 64))


def tokenizer_past_embedding(folder):
    """Tokens added past the embedding's rows (another model's tokenizer, say)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    first = tokenizer.get_vocab_size(with_added_tokens=True)
    extra = [f"<extra_{i}>" for i in range(rows - first + 8)]
    tokenizer.add_tokens(extra)
    tokenizer.save(str(folder / TOKENIZER))
    decoder = {
        str(first + i): {"content": text, "special": False, "normalized": False}
        for i, text in enumerate(extra)
    }
    edit_json(folder, "tokenizer_config.json", lambda c: c["added_tokens_decoder"].update(decoder))


def no_turn_end_token(folder):
    """A tokenizer of another family: its turns end with <|end|>, not Qwen's <|im_end|>."""
    from qwen_mlx.families import QWEN2

    for name in (TOKENIZER, "tokenizer_config.json"):
        path = folder / name
        path.write_text(path.read_text(encoding="utf-8").replace(QWEN2.turn_end, "<|end|>"))


def template_unsafe_in_the_sandbox(folder):
    unsafe = "{% for m in messages %}{{ m.__class__.__mro__ }}{% endfor %}"
    edit_json(folder, "tokenizer_config.json", lambda c: c.update(chat_template=unsafe))


def no_chat_template(folder):
    edit_json(folder, "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (folder / "chat_template.jinja").unlink(missing_ok=True)


BROKEN_FOLDERS = {
    "garbage tokenizer.json": (garbage_tokenizer, "tokenizer.json unreadable"),
    "truncated tokenizer.json": (truncated_tokenizer, "tokenizer.json unreadable"),
    "BERT config.json": (bert_config, "unsupported architecture: bert (BertForMaskedLM)"),
    "empty config.json": (empty_config, "config.json names no model_type"),
    "missing shard": (missing_shard, f"{SECOND_SHARD} missing"),
    # issue 20, item 11: each was ✓ (or ⚠) in check, then a traceback or a broken run
    "num_hidden_layers as text": (layers_as_text, "config.json: bad num_hidden_layers"),
    "vocab_size not the weights'": (vocab_size_mismatch, "vocab_size does not match the weights"),
    "tokenizer past the embedding": (
        tokenizer_past_embedding,
        "tokenizer larger than the model",
    ),
    "no <|im_end|> token": (no_turn_end_token, "tokenizer: no <|im_end|> token"),
    "template unsafe in the sandbox": (template_unsafe_in_the_sandbox, "chat template fails"),
    "no chat template": (no_chat_template, "chat template missing"),
}


def assert_check_and_train_refuse(args, expected, tmp_path):
    checked = CliRunner().invoke(cli, ["check", *args])
    assert checked.exit_code == 1, checked.output
    assert isinstance(checked.exception, SystemExit), repr(checked.exception)  # no traceback
    failed = [line for line in checked.output.splitlines() if line.startswith("✗")]
    assert any(expected in line for line in failed), checked.output
    assert "fix:" in checked.output and "not ready" in checked.output

    error = one_error_line(CliRunner().invoke(cli, ["train", *args]))
    assert expected in error and "qwen-mlx check" in error
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.parametrize("breakage", list(BROKEN_FOLDERS))
def test_broken_model_folder_is_refused_by_check_and_train(
    breakage, tiny_model_dir, small_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no config.yaml here: only the settings below count
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    breaker, expected = BROKEN_FOLDERS[breakage]
    breaker(folder)

    assert_check_and_train_refuse(settings(folder, small_data, tmp_path), expected, tmp_path)


def test_unsupported_architecture_names_what_is_supported(tiny_model_dir, tmp_path):
    from qwen_mlx.model_files import check_model_dir

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    bert_config(folder)
    (finding,) = [f for f in check_model_dir(folder) if f.status == "fail"]
    assert "Qwen2ForCausalLM" in finding.fix and "model_type qwen2" in finding.fix


def test_target_modules_that_match_nothing(tiny_model_dir, small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = settings(tiny_model_dir, small_data, tmp_path, "lora.target_modules=qkv,proj_out")

    assert_check_and_train_refuse(args, "lora.target_modules match no layer", tmp_path)


def test_a_target_with_a_typo_is_a_warning_naming_it(tiny_model_dir):
    header, _ = safetensors_header(tiny_model_dir / "model.safetensors")
    shapes = {name: info["shape"] for name, info in header.items() if name != "__metadata__"}
    finding = check_targets(shapes, ["q_proj", "v_prj"])
    assert finding.status == "warn" and "v_prj" in finding.detail
    assert "v_proj" in finding.fix  # the real names, to pick from
    assert check_targets(shapes, ["q_proj", "v_proj"]).status == "ok"


def test_an_absurd_learning_rate_is_a_warning(tmp_path, monkeypatch):
    from qwen_mlx.check import check_learning_rate

    finding = check_learning_rate(load_config(None, None, ["training.learning_rate=1e9"]))
    assert finding.status == "warn"
    assert "1e+09" in finding.detail and "outside the usual LoRA range" in finding.detail
    assert check_learning_rate(load_config(None, None, [])).status == "ok"
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(cli, ["check", "--set", "training.learning_rate=1e9"])
    assert any(line.startswith("⚠ learning rate") for line in shown.output.splitlines())


# ---------------------------------------------------------------- data files (item 14)


def good_record() -> str:
    record = {"instruction": "差旅费怎么报？", "output": "先在网上填单。"}
    return json.dumps(record, ensure_ascii=False)


DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = '{"instruction": "q", "output": "a", "n": ' + "9" * 5000 + "}"

# name → (file content, the line and reason shown for it)
UNREADABLE_FILES = {
    "unterminated quote.csv": (
        'instruction,output\nq1,a1\n"q2,a2\nq3,a3\n',
        ":3: a quote opened in this row is never closed",
    ),
    "text.parquet": ("just some text, not a table\n", ": not a readable Parquet file"),
    "nested.json": (DEEP, ": JSON nested too deeply to read"),
    "huge number.json": (f"[{HUGE_INT}]", ": a number longer than 4300 digits"),
}


@pytest.mark.parametrize("name", list(UNREADABLE_FILES))
@pytest.mark.parametrize("command", ["prepare", "stats"])
def test_unreadable_data_file_is_one_line(name, command, tmp_path):
    content, reason = UNREADABLE_FILES[name]
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    args = ["data", command, str(path)] + (["-o", str(tmp_path / "out")] * (command == "prepare"))

    error = one_error_line(CliRunner().invoke(cli, args))

    assert f"{path}{reason}" in error
    assert not (tmp_path / "out").exists()


BAD_LINES = {"nested": DEEP, "huge number": HUGE_INT}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_unreadable_line_is_skipped_and_named(kind, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good_record()}\n{BAD_LINES[kind]}\n", encoding="utf-8")

    result = CliRunner().invoke(cli, ["data", "prepare", str(path), "-o", str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and f"{path}:2: " in skipped[0]


@pytest.mark.parametrize("command", ["prepare", "stats"])
def test_only_bad_lines_lists_them_and_fails(command, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(f"{DEEP}\n{{broken\n{HUGE_INT}\n", encoding="utf-8")
    args = ["data", command, str(path)] + (["-o", str(tmp_path / "out")] * (command == "prepare"))

    result = CliRunner().invoke(cli, args)

    error = one_error_line(result)
    assert "no usable records" in error and "3 bad records" in error
    lines = result.stderr.splitlines()
    listed = [line for line in lines if f"{path}:" in line and not line.startswith("Error:")]
    assert [line.split(f"{path}:")[1].split(":")[0] for line in listed] == ["1", "2", "3"]
    assert not (tmp_path / "out").exists()
