"""Adapters move between tools: PEFT ⇄ mlx-lm conversion, and finding an adapter's base model.

Users rely on a converted adapter giving the same model in the other tool (mlx-lm's own
loader, PEFT's own loader), on a round trip changing nothing, and on ``fuse``/``export``
finding the base model from a run folder or an adapter folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lora_helpers import hf_logits, make_peft_adapter, make_run

from qwen_mlx.adapter_convert import convert_adapter
from qwen_mlx.adapters import load_adapter, resolve_source
from qwen_mlx.cli import cli
from qwen_mlx.errors import UserError
from qwen_mlx.tensor_io import index_file

pytest.importorskip("torch")
pytest.importorskip("peft")

IDS = list(range(3, 50))


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "peft")


def _mlx_logits(model_dir: Path, adapter_dir: Path) -> np.ndarray:
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter_dir))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def test_converted_adapter_gives_mlx_lm_the_same_model_as_peft(tiny_model_dir, adapter, tmp_path):
    out = tmp_path / "mlx"
    result = CliRunner().invoke(
        cli, ["adapter", "convert", str(adapter), "--to", "mlx-lm", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["lora_parameters"]["rank"] == 8 and config["lora_parameters"]["scale"] == 2.0
    names = index_file(out / "adapters.safetensors")
    assert names["model.layers.1.mlp.down_proj.lora_a"].shape == (128, 8)  # (in, r)
    assert names["model.layers.1.mlp.down_proj.lora_b"].shape == (8, 64)  # (r, out)

    expected = hf_logits(tiny_model_dir, IDS, adapter)
    assert np.abs(expected - hf_logits(tiny_model_dir, IDS)).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(_mlx_logits(tiny_model_dir, out), expected, atol=1e-4)


def test_round_trip_changes_nothing(tiny_model_dir, adapter, tmp_path):
    convert_adapter(adapter, "mlx-lm", tmp_path / "mlx")
    convert_adapter(tmp_path / "mlx", "peft", tmp_path / "peft")
    before, after = load_adapter(adapter), load_adapter(tmp_path / "peft")
    assert before.pairs.keys() == after.pairs.keys()
    for module, pair in before.pairs.items():
        np.testing.assert_array_equal(after.pairs[module].a, pair.a)
        np.testing.assert_array_equal(after.pairs[module].b, pair.b)
        assert after.pairs[module].scale == pair.scale
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    # …and PEFT's own loader takes it back.
    np.testing.assert_allclose(
        hf_logits(tiny_model_dir, IDS, tmp_path / "peft"),
        hf_logits(tiny_model_dir, IDS, adapter),
        atol=1e-5,
    )


def test_rslora_scale_is_folded_for_mlx_lm(tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(
        tiny_model_dir, tmp_path / "rs", rank=4, alpha=8, targets=["q_proj", "v_proj"],
        use_rslora=True, alpha_pattern={"v_proj": 2},
    )  # fmt: skip
    convert_adapter(adapter, "mlx-lm", tmp_path / "mlx")
    keys = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["lora_parameters"]
    assert keys["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    np.testing.assert_allclose(
        _mlx_logits(tiny_model_dir, tmp_path / "mlx"),
        hf_logits(tiny_model_dir, IDS, adapter),
        atol=1e-4,
    )


def test_fuse_and_export_find_the_base_model(tiny_model_dir, adapter, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", tiny_model_dir, adapter, "data.system_prompt=你是报销助手")
    from_run = resolve_source(run, None)
    assert from_run.model_dir == tiny_model_dir and from_run.system_prompt == "你是报销助手"
    # The adapter folder inside a run still finds the run's config.
    assert resolve_source(run / "adapter", None).system_prompt == "你是报销助手"
    # A bare adapter uses base_model_name_or_path, relative to where training ran.
    monkeypatch.chdir(tiny_model_dir.parent)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = tiny_model_dir.name
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(json.dumps(config))
    os.link(adapter / "adapter_model.safetensors", bare / "adapter_model.safetensors")
    assert resolve_source(bare, None).model_dir.resolve() == tiny_model_dir.resolve()
    # A model folder given where a run is expected is just the model.
    assert resolve_source(tiny_model_dir, None).adapter is None


def test_hub_id_base_says_how_to_get_it(adapter, tmp_path):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen2.5-3B-Instruct"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    os.link(adapter / "adapter_model.safetensors", tmp_path / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"qwen-mlx download Qwen/Qwen2\.5-3B-Instruct"):
        resolve_source(tmp_path, None)


def test_convert_rejects_bad_input_in_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["adapter", "convert", "nope", "--to", "peft", "-o", "x"])
    assert missing.exit_code == 1 and "not found" in missing.output
    bad_format = runner.invoke(cli, ["adapter", "convert", ".", "--to", "gguf", "-o", "x"])
    assert bad_format.exit_code == 2 and "mlx-lm" in bad_format.output
    empty = runner.invoke(cli, ["adapter", "convert", str(tmp_path), "--to", "peft", "-o", "x"])
    assert empty.exit_code == 1 and "adapter" in empty.output
    assert "Traceback" not in missing.output + empty.output


def _copy_adapter(adapter: Path, out: Path, **config_changes) -> Path:
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text()) | config_changes
    (out / "adapter_config.json").write_text(json.dumps(config))
    os.link(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"r": 4}, "says rank 4 but the weights of model.layers.0.mlp.down_proj have rank 8"),
        ({"rank_pattern": {"q_proj": 16}}, "says rank 16 but the weights of model.layers.0.self"),
        ({"target_modules": ["q_proj", "v_proj"]}, "does not target model.layers.0.mlp.down_proj"),
    ],
    ids=["rank", "rank-pattern", "targets"],
)
def test_a_config_that_disagrees_with_its_weights_is_one_error_for_every_command(
    changes, needle, tiny_model_dir, adapter, tmp_path
):
    # PEFT (chat, serve, eval on torch) builds layers from the config; fuse and export read
    # the weights. They would run different models, so every command refuses the same way.
    bad = _copy_adapter(adapter, tmp_path / "bad", **changes)
    base = ["--model", str(tiny_model_dir)]
    commands = {
        "fuse": ["fuse", str(bad), *base, "-o", str(tmp_path / "fused")],
        "export": ["export", str(bad), *base, "-o", str(tmp_path / "x.gguf")],
        "chat": ["chat", str(bad), *base, "--prompt", "hi", "--backend", "torch"],
    }
    for args in commands.values():
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert needle in result.output and "do not belong together" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_truncated_adapter_says_to_copy_the_adapter_not_the_model(adapter, tmp_path):
    cut = _copy_adapter(adapter, tmp_path / "cut")
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").unlink()  # a hard link: write a new, shorter file
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match="truncated; the adapter is incomplete") as err:
        load_adapter(cut)
    assert "download the model" not in str(err.value)


# ---------------------------------------------------------------- adapters that are more than LoRA


def test_unconverted_pissa_is_refused_with_the_peft_conversion(tiny_model_dir, tmp_path):
    # PiSSA also rewrites the base weights: applied to the original base, the adapter alone
    # gives another model, so fuse/export/convert refuse it and name PEFT's conversion.
    pissa = make_peft_adapter(tiny_model_dir, tmp_path / "pissa", init_lora_weights="pissa")
    result = CliRunner().invoke(
        cli, ["fuse", str(pissa), "--model", str(tiny_model_dir), "-o", "x"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "init_lora_weights='pissa', which also changes the base weights" in result.output
    assert "path_initial_model_for_weight_conversion" in result.output
    for init in ("olora", "corda", "loftq", "pissa_niter_4"):
        with pytest.raises(UserError, match=f"init_lora_weights='{init}'"):
            load_adapter(_copy_adapter(pissa, tmp_path / init, init_lora_weights=init))


def test_converted_pissa_fuses_to_the_model_peft_gives(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_mlx.export.fuse import fuse
    from qwen_mlx.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "f32", dtype="float32", seed=3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # stands in for training
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    converted = tmp_path / "converted"
    initial = str(tmp_path / "initial")
    peft_model.save_pretrained(converted, path_initial_model_for_weight_conversion=initial)
    fuse(converted, tmp_path / "fused", model=base)
    expected = hf_logits(base, IDS, converted)
    assert np.abs(expected - hf_logits(base, IDS)).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(hf_logits(tmp_path / "fused", IDS), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"modules_to_save": ["lm_head"]}, "sets modules_to_save=['lm_head']: it holds whole"),
        ({"bias": "all"}, "sets bias='all': it holds trained biases"),
        ({"lora_bias": True}, "sets lora_bias=true: lora_B has a bias"),
        ({"targets": ["q_proj", "embed_tokens"]}, "targets embed_tokens: a LoRA on the embeddings"),
    ],
    ids=["modules_to_save", "bias", "lora_bias", "embedding"],
)
def test_peft_options_beyond_lora_are_named_with_the_fix(options, needle, tiny_model_dir, tmp_path):
    made = make_peft_adapter(tiny_model_dir, tmp_path / "a", **options)
    with pytest.raises(UserError) as err:
        load_adapter(made)
    assert str(err.value).startswith(f"{made / 'adapter_config.json'} {needle}")
    assert "train with" in str(err.value) or "train without" in str(err.value)


def test_saved_embedding_layer_names_save_embedding_layers(adapter, tmp_path):
    from safetensors.numpy import load_file, save_file

    extra = _copy_adapter(adapter, tmp_path / "extra")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.weight"] = np.zeros((4, 2), np.float32)
    (extra / "adapter_model.safetensors").unlink()
    save_file(tensors, extra / "adapter_model.safetensors")
    with pytest.raises(UserError, match="save the adapter with save_embedding_layers=False"):
        load_adapter(extra)
