"""The MLX backend's own behaviour on the tiny model (mlx[cpu] here): compiled gradients,
checkpoint faults, pre-quantized folders, PEFT adapters read by MLX, generation, the memory fit
on a Mac. What every backend must do (learning, packing, resume, a PEFT-readable adapter,
4-bit) is in test_backend_contract.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.nn as nn  # noqa: E402
from backend_helpers import mlx_lora_model  # noqa: E402
from lora_helpers import hf_logits  # noqa: E402
from repo_helpers import QWEN25_3B  # noqa: E402
from train_helpers import run_config, start_run  # noqa: E402

from qwen_mlx import memory  # noqa: E402
from qwen_mlx.backends import mlx_model  # noqa: E402
from qwen_mlx.backends.base import GenerationSettings  # noqa: E402
from qwen_mlx.backends.mlx_trainer import MLXBackend  # noqa: E402
from qwen_mlx.config import ALL_LINEAR  # noqa: E402
from qwen_mlx.config_file import load_config  # noqa: E402


def train(cfg, resume=False):
    return start_run(cfg, "mlx", resume)


def adapter_weights(run_dir):
    from safetensors.numpy import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def fp32_logits(model, ids: np.ndarray) -> np.ndarray:
    model.set_dtype(mx.float32)  # bf16 base → fp32 is exact; LoRA weights are fp32 already
    return np.array(model(mx.array(ids)))


def packed_batch(rows=2, length=64, seed=0):
    """Rows of three samples each with random targets, as the loop hands them over."""
    rng = np.random.default_rng(seed)
    segments = np.repeat(np.arange(1, 4), -(-length // 3))[:length]
    return {
        "input_ids": rng.integers(5, 500, (rows, length)).astype(np.int32),
        "loss_mask": rng.integers(0, 2, (rows, length)).astype(np.int8),
        "segment_ids": np.tile(segments, (rows, 1)).astype(np.int32),
        "position_ids": np.zeros((rows, length), dtype=np.int32),  # unused: RoPE is relative
    }


def gradients(model_dir, *extra):
    from mlx.utils import tree_flatten

    from qwen_mlx.backends.mlx_trainer import MLXHooks

    cfg = load_config(None, None, [f"model.path={model_dir}", "lora.dropout=0", *extra])
    hooks = MLXHooks(mlx_lora_model(model_dir), cfg)
    loss = hooks.micro_step(packed_batch(), {"tokens": 0.5}, sync=True)["loss"]
    return loss, {k: np.array(g) for k, g in tree_flatten(hooks.grads)}


def test_checkpointing_and_loss_chunks_leave_the_compiled_gradients_unchanged(
    tiny_model_dir, monkeypatch
):
    loss, plain = gradients(tiny_model_dir)
    monkeypatch.setattr(mlx_model, "LOSS_CHUNK", 16)  # several chunks, each recomputed
    for variant in (
        gradients(tiny_model_dir),
        gradients(tiny_model_dir, "training.gradient_checkpointing=true"),
        gradients(
            tiny_model_dir,
            "training.gradient_checkpointing=true",
            "training.checkpoint_fraction=0.5",  # selective: the first of the two layers
        ),
    ):
        assert variant[0] == pytest.approx(loss, rel=1e-5)
        for key, grad in plain.items():
            np.testing.assert_allclose(variant[1][key], grad, atol=1e-6, rtol=1e-4, err_msg=key)
    assert any(np.abs(g).max() > 0 for g in plain.values())


def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(
    tiny_model_dir, small_data, tmp_path
):
    common = ["training.num_epochs=3", "lora.dropout=0.1", "training.save_every=2"]
    straight = run_config(tiny_model_dir, small_data, tmp_path / "a", *common)
    straight.training.max_steps = 6
    train(straight)
    first = run_config(tiny_model_dir, small_data, tmp_path / "b", *common)
    first.training.max_steps = 4
    train(first)
    optimizer = tmp_path / "b" / "checkpoints" / "step-000004" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # as a disk fault leaves it
    first.training.max_steps = 6
    train(first, resume=True)
    assert (tmp_path / "b" / "checkpoints" / "step-000004.corrupt").is_dir()
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_full_disk_during_a_checkpoint_is_one_line(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    import errno

    from click.testing import CliRunner
    from disk_faults import FaultyDisk, under

    from qwen_mlx.cli import cli

    run = tmp_path / "run"
    sets = [
        f"model.path={tiny_model_dir}",
        "model.quantization=none",
        f"output.dir={run}",
        f"data.train_file={small_data}",
        "training.max_seq_length=256",
        "training.max_steps=4",
        "training.save_every=2",
        "training.packing=true",  # packed rows: no epoch ends (and saves) before step 4
    ]
    full = FaultyDisk(
        monkeypatch,
        errno.ENOSPC,
        under(run / "checkpoints"),
        armed=(run / "checkpoints" / "step-000002").is_dir,
    )
    result = CliRunner().invoke(cli, ["train", "--backend", "mlx", *(f"--set={s}" for s in sets)])
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert full.failed and "step-000004: No space left on device" in line, line
    assert "the last checkpoint is" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]


def test_pre_quantized_mlx_folder_loads_as_stored(tiny_model_dir, tmp_path):
    from mlx_lm.convert import convert

    convert(str(tiny_model_dir), str(tmp_path / "q4"), quantize=True, q_group_size=64, q_bits=4)
    model, note = mlx_model.load_base(tmp_path / "q4", "4bit")
    assert "already quantized (4-bit)" in note
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    mlx_model.add_lora(model, ["q_proj"], rank=4, alpha=8, dropout=0.0, seed=0)
    assert np.isfinite(np.array(model(mx.array([[5, 6, 7]])).astype(mx.float32))).all()


def peft_adapter(model_dir, out_dir, seed=0):
    """A PEFT adapter with a non-zero B and a scale other than 2 (alpha 12, r 4)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape) * 0.2
    model.save_pretrained(out_dir)
    return out_dir


def test_a_peft_adapter_gives_the_same_logits_on_mlx(tiny_model_dir, tmp_path):
    adapter = peft_adapter(tiny_model_dir, tmp_path / "peft")
    ids = np.random.default_rng(1).integers(5, 500, (1, 30))
    engine = MLXBackend().engine(tiny_model_dir, adapter)
    np.testing.assert_allclose(
        fp32_logits(engine.model, ids)[0],
        hf_logits(tiny_model_dir, ids[0].tolist(), adapter),
        atol=1e-3,
        rtol=0,
    )


def test_generate_streams_a_greedy_reply(tiny_model_dir):
    engine = MLXBackend().engine(tiny_model_dir)
    ids = engine.prompt_ids([{"role": "user", "content": "差旅费怎么报销？"}], 12)
    settings = GenerationSettings(max_tokens=12, temperature=0.0)
    pieces = list(engine.pieces(ids, settings))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "<|im_end|>" not in "".join(pieces)
    assert pieces == list(engine.pieces(ids, settings))  # greedy: repeatable
    assert len(pieces) <= 12  # one piece per generated token


def test_memory_fit_advises_on_an_8gb_mac(tmp_path, monkeypatch):
    import qwen_mlx.backends.mlx_trainer as trainer

    model_dir = tmp_path / "Qwen2.5-3B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN25_3B))
    cfg = load_config(None, None, [f"model.path={model_dir}", "model.quantization=none"])
    monkeypatch.setattr(trainer, "_device_memory", lambda: (8 * 1024**3, {}))
    fit = memory.fit(cfg, MLXBackend().plan(cfg))
    text = " ".join(fit.notes)
    assert "will not fit" in text and "model.quantization: 4bit" in text
    assert "gradient_checkpointing: true" in text
    assert fit.tight  # the trainer then hands freed buffers back (mx.set_cache_limit)


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "qwen_mlx", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_train_command_end_to_end(tiny_model_dir, small_data, tmp_path):
    sets = [
        f"model.path={tiny_model_dir}",
        "model.quantization=none",
        f"data.train_file={small_data}",
        "output.dir=run",
        "training.max_seq_length=256",
        "training.max_steps=3",
    ]
    done = cli("train", "--backend", "mlx", *[x for s in sets for x in ("--set", s)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend: mlx" in done.stdout
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "loss.png").is_file()
    assert [
        m["step"]
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if m["type"] == "train"
    ] == [1, 2, 3]


def test_importing_the_trainer_does_not_import_mlx():
    code = (
        "import sys, qwen_mlx.backends.mlx_trainer\n"
        "assert not [m for m in ('mlx', 'mlx_lm', 'torch') if m in sys.modules], sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_memory_fit_recomputes_only_the_layers_memory_needs(tiny_model_dir, monkeypatch):

    from qwen_mlx.backends import mlx_trainer
    from qwen_mlx.memory import estimate_training_memory

    cfg = load_config(None, None, [f"model.path={tiny_model_dir}", "model.quantization=none"])
    config = json.loads((tiny_model_dir / "config.json").read_text())
    estimate = estimate_training_memory(
        config,
        quantization="none",
        rank=16,
        targets=ALL_LINEAR,
        max_seq_length=1024,
        batch_size=1,
        fp32=True,
    )
    layers = config["num_hidden_layers"]
    short = int(estimate.with_recompute(layers).total / 0.9) + 1
    monkeypatch.setattr(mlx_trainer, "_device_memory", lambda: (short, {}))
    fit = memory.fit(cfg, MLXBackend().plan(cfg))
    assert cfg.training.gradient_checkpointing and cfg.training.checkpoint_fraction == 1.0
    assert f"recomputing {layers} of {layers} layers" in " ".join(fit.notes)


def test_torch_only_speed_options_are_named_on_mlx(tiny_model_dir, small_data, tmp_path):
    import io

    cfg = run_config(
        tiny_model_dir,
        small_data,
        tmp_path / "run",
        "training.max_steps=1",
        "training.kernels=liger",
        "training.attention=flex",
    )
    out = io.StringIO()
    start_run(cfg, "mlx", console=Console(file=out, width=400))
    assert "training.kernels: liger is for the torch backend" in out.getvalue()
    assert "training.attention: flex is for the torch backend" in out.getvalue()
