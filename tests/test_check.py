"""`qwen-mlx check`: tells a complete model from a missing one and from a damaged one."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from repo_helpers import QWEN25_3B

from qwen_mlx.cli import cli
from qwen_mlx.config_file import load_config
from qwen_mlx.memory import (
    GiB,
    estimate_training_memory,
    fit_recompute,
    lora_parameter_count,
    parameter_count,
)
from qwen_mlx.model_files import check_model_dir

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def f32_model(tmp_path_factory):
    from qwen_mlx.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny-f32", dtype="float32")


def statuses(findings):
    return {f.title: f.status for f in findings}


def test_complete_model_passes(tiny_model_dir):
    findings = check_model_dir(tiny_model_dir)
    assert findings and all(f.status == "ok" for f in findings), findings


def test_missing_model_says_how_to_download(tmp_path):
    (finding,) = check_model_dir(tmp_path / "models" / "Qwen" / "Qwen2.5-3B")
    assert finding.status == "fail"
    assert "qwen-mlx download Qwen/Qwen2.5-3B" in finding.fix


def test_truncated_single_file_is_caught(tiny_model_dir, tmp_path):
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    bad = [f for f in check_model_dir(broken) if f.status == "fail"]
    assert len(bad) == 1 and "wrong size" in bad[0].title
    assert "resumes" in bad[0].fix


def test_sharded_model_every_shard_checked(f32_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    out = shutil.copytree(f32_model, tmp_path / "sharded")
    weights = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert statuses(check_model_dir(out))["weights"] == "ok"

    second = out / "model-00002-of-00002.safetensors"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])  # an interrupted download
    assert any("00002" in f.title and "wrong size" in f.title for f in check_model_dir(out))

    second.unlink()
    assert any("00002" in f.title and "missing" in f.title for f in check_model_dir(out))

    second.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert any("unreadable" in f.title for f in check_model_dir(out))


def test_memory_estimate_uses_real_model_sizes():
    assert parameter_count(QWEN25_3B) == pytest.approx(3.09e9, rel=0.01)
    assert lora_parameter_count(QWEN25_3B, 16, ALL) == pytest.approx(29.9e6, rel=0.01)
    est = estimate_training_memory(
        QWEN25_3B, quantization="4bit", rank=16, targets=ALL, max_seq_length=1024, batch_size=1
    )
    full = estimate_training_memory(
        QWEN25_3B, quantization="none", rank=16, targets=ALL, max_seq_length=1024, batch_size=1
    )
    short = estimate_training_memory(
        QWEN25_3B, quantization="4bit", rank=16, targets=ALL, max_seq_length=256, batch_size=1
    )
    assert short.total < est.total < full.total
    assert 1.5e9 < est.parts["base weights"] < 2.5e9  # 4-bit 3B weights: about 2 GB


def demo_args(model_dir, data_dir):
    return [
        "check",
        "--set",
        f"model.path={model_dir}",
        "--set",
        "model.quantization=none",
        "--set",
        f"data.train_file={data_dir / 'train.jsonl'}",
        "--set",
        "data.test_file=null",
        "--set",
        "training.backend=torch",
    ]


@pytest.fixture
def small_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(10)]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{broken\n"
    (folder / "train.jsonl").write_text(text, encoding="utf-8")
    return folder


def test_check_command_ready_with_tiny_model(tiny_model_dir, small_data, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, demo_args(tiny_model_dir, small_data))
    assert result.exit_code == 0, result.output
    assert "ready to train" in result.output
    assert "train.jsonl:11: invalid JSON" in result.output  # the bad line is named
    assert "memory" in result.output and "GiB" in result.output
    # training.packing: auto's choice for this place (torch on this CPU), as training makes it
    assert "✓ row layout — bucketed: one sample a row, in batches of similar lengths" in (
        result.output
    )
    assert "(training.packing: auto picks it on torch/cpu)" in result.output


def test_check_shows_what_the_backend_will_do_differently(
    tiny_model_dir, small_data, monkeypatch, tmp_path
):
    # The same plan training prints: here MLX ignoring a torch-only option.
    pytest.importorskip("mlx.core")
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "training.backend=mlx", "--set", "training.kernels=liger"]
    result = CliRunner().invoke(cli, [*demo_args(tiny_model_dir, small_data), *sets])
    assert result.exit_code == 0, result.output
    assert "⚠ backend plan — training.kernels: liger is for the torch backend" in result.output
    assert "memory" in result.output
    assert "row layout — bucketed" in result.output and "auto picks it on mlx" in result.output
    packed = CliRunner().invoke(
        cli, [*demo_args(tiny_model_dir, small_data), *sets, "--set", "training.packing=true"]
    )
    assert "row layout — packed: samples packed into rows" in packed.output
    assert "auto picks" not in packed.output


def test_check_command_not_ready_without_model(small_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, demo_args(tmp_path / "models/Qwen/Qwen2.5-3B", small_data))
    assert result.exit_code == 1
    assert "qwen-mlx download Qwen/Qwen2.5-3B" in result.output
    assert "not ready" in result.output


def test_check_command_reports_a_bad_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("lora:\n  rnak: 8\n")
    result = CliRunner().invoke(cli, ["check"])
    assert result.exit_code == 1
    assert "did you mean 'lora.rank'" in result.output


def _estimate_3b(seq: int):
    return estimate_training_memory(
        QWEN25_3B, quantization="4bit", rank=16, targets=ALL, max_seq_length=seq, batch_size=1
    )


def test_checkpointing_estimate_keeps_layer_inputs_and_one_layer():
    est = _estimate_3b(4096)
    layers = QWEN25_3B["num_hidden_layers"]
    per_layer = est.parts["activations"] / layers
    every = est.with_recompute(layers)
    assert every.parts["activations"] == pytest.approx(layers * est.layer_input + per_layer)
    half = est.with_recompute(layers // 2)
    assert every.total < half.total < est.total
    assert est.parts["logits"] == 1024 * QWEN25_3B["vocab_size"] * 8  # one loss chunk only


def test_fewest_recomputed_layers_that_fit():
    est = _estimate_3b(4096)
    assert est.layers_to_fit(est.total) == 0
    fewest = est.layers_to_fit(12 * GiB)
    assert 0 < fewest < QWEN25_3B["num_hidden_layers"]
    assert est.with_recompute(fewest).total <= 12 * GiB
    assert est.with_recompute(fewest - 1).total > 12 * GiB
    assert est.layers_to_fit(2 * GiB) is None  # the 4-bit weights alone are about 2 GB


def test_fit_recompute_turns_on_only_what_memory_needs():
    est = _estimate_3b(4096)
    roomy = load_config(None, None, []).training
    assert fit_recompute(roomy, est, 80 * GiB) is None
    assert not roomy.gradient_checkpointing
    tight = load_config(None, None, []).training
    note = fit_recompute(tight, est, 16 * GiB)
    recomputed = round(tight.checkpoint_fraction * QWEN25_3B["num_hidden_layers"])
    assert tight.gradient_checkpointing and recomputed == est.layers_to_fit(0.9 * 16 * GiB)
    assert f"recomputing {recomputed} of 36 layers" in note
    chosen = load_config(None, None, ["training.gradient_checkpointing=true"]).training
    assert fit_recompute(chosen, est, 16 * GiB) is None  # the user's choice stands
    assert chosen.checkpoint_fraction == 1.0
    hopeless = load_config(None, None, []).training
    assert fit_recompute(hopeless, est, 2 * GiB) is None  # check and the guard say so
    assert not hopeless.gradient_checkpointing


def test_check_says_when_training_will_checkpoint_to_fit(tmp_path):
    import qwen_mlx.check as check
    from qwen_mlx.backends.base import DevicePlan

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_3B))
    plan = DevicePlan("a 16 GB Mac", "4bit", fp32=False, device_memory=16 * GiB)
    cfg = load_config(
        None,
        None,
        [
            f"model.path={tmp_path}",
            "model.quantization=4bit",
            "training.max_seq_length=4096",
        ],
    )
    finding = check.check_memory(cfg, plan)
    assert finding.status != "fail", finding  # fitted to 90%: "tight" at most
    assert "training will recompute" in finding.detail and "of 36 layers" in finding.detail
    roomy = load_config(None, None, [f"model.path={tmp_path}", "model.quantization=4bit"])
    assert "recompute" not in check.check_memory(roomy, plan).detail
    assert not cfg.training.gradient_checkpointing  # check changes no setting


def _damaged(model, tmp_path, old, new):
    """A copy of ``model`` with ``old`` replaced by ``new`` in its tokenizer files."""
    broken = shutil.copytree(model, tmp_path / "broken")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = broken / name
        path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    return broken


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "qwen3_dir"])
def test_each_family_passes_and_fails_without_its_turn_end(fixture, request, tmp_path):
    from qwen_mlx.families import find_family
    from qwen_mlx.model_files import read_model_config

    model = request.getfixturevalue(fixture)
    found = statuses(check_model_dir(model))
    assert set(found.values()) == {"ok"}, found
    assert {"control tokens", "chat template", "vocabulary"} <= set(found)
    family = find_family(read_model_config(model))

    broken = _damaged(model, tmp_path, family.turn_end, "<|end|>")
    failed = [f for f in check_model_dir(broken) if f.status == "fail"]
    assert failed[0].title == f"tokenizer: no {family.turn_end} token" and failed[0].fix
    # Its template, now closing turns with <|end|>, is named too.
    assert [f.title for f in failed[1:]] == ["chat template does not close turns"]


def test_a_template_that_never_closes_a_turn_fails(tiny_model_dir, tmp_path):
    # Each message's text and nothing else: a tuned model would never learn to stop.
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    config = json.loads((broken / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (broken / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    (failed,) = [f for f in check_model_dir(broken) if f.status == "fail"]
    assert failed.title == "chat template does not close turns"
    assert "chat_template.jinja" in failed.fix
