"""The torch backend's speed options: selective checkpointing, FlexAttention on packed rows,
and Liger Kernel's fused kernels (CUDA), with the one-line notes where one cannot run."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from qwen_mlx.backends.torch_model import (  # noqa: E402
    TokenLoss,
    add_lora,
    attention_plan,
    kernel_plan,
    load_base,
)
from qwen_mlx.config_file import load_config  # noqa: E402

CPU = torch.device("cpu")


def _lora(model_dir, *overrides, device=CPU, attention="sdpa", liger=False):
    cfg = load_config(None, None, [f"model.path={model_dir}", "lora.dropout=0", *overrides])
    base = load_base(model_dir, "none", device, attention)
    if liger:
        from qwen_mlx.backends.torch_model import apply_liger

        apply_liger(base)
    model = add_lora(base, cfg)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter
            param.data = torch.randn(param.shape, generator=generator).to(param) * 0.1
    return model


def _packed_batch(device=CPU, lengths=(40, 30, 26)):
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(5, 500, (1, sum(lengths)))).long()
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    mask = torch.from_numpy(rng.integers(0, 2, (1, sum(lengths)))).long()
    return ids.to(device), pos.to(device), mask.to(device)


def _lora_grads(model, batch, fused=False):
    model.train()
    model.zero_grad()
    TokenLoss(model, fused_cross_entropy=fused)(*batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_selective_checkpointing_recomputes_the_first_layers_and_keeps_gradients(
    tiny_model_dir,
):
    plain = _lora_grads(_lora(tiny_model_dir), _packed_batch())
    for fraction, expected in (("0.5", [True, False]), ("1.0", [True, True])):
        model = _lora(
            tiny_model_dir,
            "training.gradient_checkpointing=true",
            f"training.checkpoint_fraction={fraction}",
        )
        layers = model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == expected
        grads = _lora_grads(model, _packed_batch())
        for name, grad in plain.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)


def test_checkpoint_fraction_out_of_range_is_one_clear_error(tiny_model_dir):
    from qwen_mlx.errors import UserError

    with pytest.raises(UserError, match=r"training.checkpoint_fraction.*\(0, 1\]"):
        load_config(None, None, ["training.checkpoint_fraction=0"])


def test_flex_attention_keeps_packed_samples_apart(tiny_model_dir):
    # FlexAttention trains only on CUDA (PyTorch has no CPU backward); its forward runs
    # here, and gets the same block mask from the packed position ids that training uses.
    ids, pos, _ = _packed_batch()
    sdpa = load_base(tiny_model_dir, "none", CPU, "sdpa")
    flex = load_base(tiny_model_dir, "none", CPU, "flex_attention")
    with torch.no_grad():
        packed = flex(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        start = 0
        for length in (40, 30, 26):
            part = slice(start, start + length)
            alone = sdpa(input_ids=ids[:, part], use_cache=False).logits[0]
            torch.testing.assert_close(packed[part], alone, atol=1e-4, rtol=1e-4)
            start += length


def test_speed_options_that_cannot_run_here_say_so_in_one_line():
    attention, note = attention_plan("flex", CPU)
    assert (attention, note) == ("sdpa", "training.attention: flex needs CUDA; using sdpa")
    assert attention_plan("auto", CPU) == ("sdpa", None)
    assert kernel_plan("liger", CPU) == (
        False,
        "training.kernels: liger needs CUDA (Triton); using PyTorch's kernels",
    )
    assert kernel_plan("auto", CPU) == (False, None)  # auto stays quiet where it cannot help
    assert kernel_plan("none", torch.device("cuda")) == (False, None)


def test_liger_without_the_package_falls_back_with_the_install_line(monkeypatch):
    import qwen_mlx.backends.torch_model as tm

    monkeypatch.setattr(tm, "_liger_available", lambda: False)
    cuda = torch.device("cuda")
    assert kernel_plan("liger", cuda) == (
        False,
        "training.kernels: liger needs liger-kernel (pip install liger-kernel)",
    )
    assert kernel_plan("auto", cuda) == (False, None)


def test_liger_is_used_on_cuda_only_when_asked_for(monkeypatch):
    import qwen_mlx.backends.torch_model as tm

    monkeypatch.setattr(tm, "_liger_available", lambda: True)
    cuda = torch.device("cuda")
    assert kernel_plan("liger", cuda) == (True, None)
    assert kernel_plan("auto", cuda) == (False, None)  # opt-in until measured on a GPU


@pytest.mark.gpu
def test_liger_and_flex_give_plain_gradients_on_cuda(tiny_model_dir):
    pytest.importorskip("liger_kernel")
    cuda = torch.device("cuda")
    batch = _packed_batch(cuda)
    plain = _lora_grads(_lora(tiny_model_dir, device=cuda), batch)
    fast = _lora(tiny_model_dir, device=cuda, attention="flex_attention", liger=True)
    grads = _lora_grads(fast, batch, fused=True)
    for name, grad in plain.items():  # bf16 on CUDA: compare the direction and the size
        a, b = grads[name].float().flatten(), grad.float().flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, name
        assert a.norm() == pytest.approx(float(b.norm()), rel=0.05), name


def test_training_checkpoints_layers_by_itself_when_memory_is_short(
    tiny_model_dir, tmp_path, monkeypatch
):
    import io
    import json

    from rich.console import Console
    from train_helpers import run_config, start_run, write_short_records

    from qwen_mlx import memory

    data = write_short_records(tmp_path / "train.jsonl", n=6)
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", "training.max_steps=1")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    estimate = memory.estimate_training_memory(
        config,
        quantization="none",
        rank=8,
        targets=list(cfg.lora.target_modules),
        max_seq_length=256,
        batch_size=2,
        fp32=True,
    )
    # Room for the run only with every layer recomputed: this machine, made small.
    short = estimate.with_recompute(estimate.layers).total / 0.9 + 1
    monkeypatch.setattr(memory, "system_memory", lambda: short)
    out = io.StringIO()
    _, model = start_run(cfg, "torch", console=Console(file=out, width=400))
    layers = model.get_base_model().model.layers
    assert len(layers) > 0 and all(layer.gradient_checkpointing for layer in layers)
    assert f"recomputing {len(layers)} of {len(layers)} layers" in out.getvalue()


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_liger_with_a_preference_objective_says_its_loss_is_chunked(monkeypatch, objective):
    import qwen_mlx.backends.torch_model as tm
    from qwen_mlx.backends.torch_trainer import TorchBackend

    monkeypatch.setattr(tm, "kernel_plan", lambda kernels, device: (True, None))
    sets = ["model.quantization=none", "training.kernels=liger"]
    sft = TorchBackend().plan(load_config(None, None, sets))
    assert not any("liger" in note for note in sft.notes)
    plan = TorchBackend().plan(load_config(None, None, [*sets, f"training.objective={objective}"]))
    assert any(f"{objective} needs each answer's log-prob" in note for note in plan.notes)
    assert "chunked loss" in dict(plan.facts)["torch kernels"]
