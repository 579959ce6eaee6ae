"""Preference training (DPO, ORPO) on the tiny model: the pair data a run reads, MLX and
torch computing the same loss and gradients, and runs that learn, resume exactly and train
on a 4-bit base. (The losses against TRL's: test_preference_trl.py.)

The pairs are made from the bundled data: chosen = a question's reference answer, rejected =
an answer from a pool of other questions' answers that are never chosen. A random tiny model
cannot learn what the answers mean; what carries to held-out questions is that the pool's
answers are the rejected kind, which is what DPO's rewards there measure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from repo_helpers import BUNDLED_TRAIN
from train_helpers import metrics, start_run

from qwen_mlx.config_file import load_config
from qwen_mlx.errors import UserError
from qwen_mlx.tokens import encode_pair, encode_pairs

BACKENDS = ["torch", "mlx"]


def _bundled(n: int) -> list[dict]:
    rows = [json.loads(x) for x in BUNDLED_TRAIN.read_text(encoding="utf-8").splitlines()]
    return sorted(rows, key=lambda r: len(r["output"]))[:n]


def _pair(record: dict, rejected: str) -> dict:
    return {"instruction": record["instruction"], "chosen": record["output"], "rejected": rejected}


def _write(path: Path, records: list[dict]) -> Path:
    lines = (json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, Path]:
    """SFT records, training pairs and held-out pairs (new questions, the same rejected pool)."""
    rows, folder = _bundled(48), tmp_path_factory.mktemp("pairs")
    pool = [r["output"] for r in rows[32:]]
    return {
        "sft": _write(folder / "sft.jsonl", rows[:32]),
        "train": _write(
            folder / "train.jsonl", [_pair(r, pool[i % 16]) for i, r in enumerate(rows[:24])]
        ),
        "held": _write(
            folder / "held.jsonl", [_pair(r, pool[(i + 5) % 16]) for i, r in enumerate(rows[24:32])]
        ),
    }


def _config(model_dir, data: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        None,
        [
            f"model.path={model_dir}",
            "model.quantization=none",
            f"data.train_file={data}",
            f"output.dir={run_dir}",
            "training.max_seq_length=256",
            "training.batch_size=4",
            "training.gradient_accumulation_steps=1",
            "training.warmup_steps=2",
            "lora.rank=8",
            "lora.alpha=16",
            "lora.dropout=0",
            *extra,
        ],
    )


# ---------------------------------------------------------------- data


FORMATS = {
    "alpaca": {"instruction": "Q?", "chosen": "yes", "rejected": "no"},
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Q?"}],
        "chosen": {"from": "gpt", "value": "yes"},
        "rejected": {"from": "gpt", "value": "no"},
    },
    "messages": {
        "messages": [{"role": "user", "content": "Q?"}],
        "chosen": {"role": "assistant", "content": "yes"},
        "rejected": {"role": "assistant", "content": "no"},
    },
    "trl": {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    },
    "trl-text": {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
    "openai": {
        "input": {"messages": [{"role": "user", "content": "Q?"}]},
        "preferred_output": [{"role": "assistant", "content": "yes"}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    },
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_pair_format_trains_the_answers_only(name, tiny_tokenizer):
    pair = encode_pair(tiny_tokenizer, FORMATS[name])
    targets = [
        tiny_tokenizer.decode([t for t, m in zip(s.input_ids, s.loss_mask, strict=True) if m])
        for s in (pair.chosen, pair.rejected)
    ]
    assert targets == ["yes<|im_end|>", "no<|im_end|>"]
    prompt = tiny_tokenizer.decode(pair.chosen.input_ids[: pair.chosen.loss_mask.index(1)])
    assert "Q?" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert pair.problem is None


def test_earlier_assistant_turns_are_context_not_targets(tiny_tokenizer):
    record = {
        "prompt": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "earlier"},
            {"role": "user", "content": "second"},
        ],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    pair = encode_pair(tiny_tokenizer, record)
    chosen = pair.chosen
    trained = [t for t, m in zip(chosen.input_ids, chosen.loss_mask, strict=True) if m]
    assert tiny_tokenizer.decode(trained) == "good<|im_end|>"


def test_identical_and_too_long_pairs_are_dropped_and_counted(tiny_tokenizer, tmp_path):
    from qwen_mlx.data_prefs import load_pairs

    path = _write(
        tmp_path / "p.jsonl",
        [
            {"instruction": "Q1", "chosen": "same", "rejected": "same"},
            {"instruction": "Q2 " + "很长的问题" * 400, "chosen": "a", "rejected": "b"},
            {"instruction": "Q3", "chosen": "a", "rejected": "b"},
        ],
    )
    pairs, report = load_pairs([path], "dpo")
    assert report.identical == 1 and len(pairs) == 2
    assert "1 pairs dropped whose chosen and rejected answers are the same" in report.summary()
    samples, encoded = encode_pairs(tiny_tokenizer, [p for p, _ in pairs], 256)
    assert len(samples) == 1 and encoded.prompt_too_long == 1
    assert any("prompt leaves no answer token" in w for w in encoded.warnings(256))


def test_data_stats_counts_pairs_and_their_lengths(tiny_model_dir, pair_files, tmp_path):
    from qwen_mlx.dataprep import stats

    path = _write(
        tmp_path / "p.jsonl",
        [
            *(json.loads(x) for x in pair_files["held"].read_text(encoding="utf-8").splitlines()),
            {"instruction": "Q", "chosen": "same", "rejected": "same"},
        ],
    )
    result = stats(path, tiny_model_dir, 256)
    assert (result["pairs"], result["identical_dropped"], result["formats"]) == (
        8,
        1,
        {"alpaca": 8},
    )
    assert 0 < result["chosen_tokens"]["min"] <= result["chosen_tokens"]["max"] <= 256
    assert result["packed_rows"] >= 1 and result["prompt_too_long_dropped"] == 0


def test_each_objective_refuses_the_other_kind_of_data(tiny_model_dir, pair_files, tmp_path):
    from qwen_mlx.run_data import build_run_data
    from qwen_mlx.tokens import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    sft_on_pairs = _config(tiny_model_dir, pair_files["train"], tmp_path / "a")
    with pytest.raises(UserError, match=r"train\.jsonl:1: this is preference pairs"):
        build_run_data(sft_on_pairs, tokenizer)
    dpo_on_sft = _config(
        tiny_model_dir, pair_files["sft"], tmp_path / "b", "training.objective=dpo"
    )
    with pytest.raises(UserError, match=r"sft\.jsonl:1: not a preference pair.*objective: sft"):
        build_run_data(dpo_on_sft, tokenizer)


def test_a_pairs_two_samples_share_a_row(tiny_model_dir, pair_files, tmp_path):
    from qwen_mlx.run_data import build_run_data
    from qwen_mlx.tokens import load_tokenizer

    cfg = _config(
        tiny_model_dir,
        pair_files["train"],
        tmp_path,
        "training.objective=dpo",
        "training.packing=true",
    )
    data = build_run_data(cfg, load_tokenizer(tiny_model_dir))
    assert all(len(r.input_ids) == 512 for r in data.train)  # 2 × max_seq_length
    segments = [r.num_segments for r in data.train]
    assert sum(segments) == 2 * 23 and all(n % 2 == 0 for n in segments)  # 24 − 1 for valid
    assert any(n > 2 for n in segments)  # several pairs packed in a row


# ---------------------------------------------------------------- MLX equals torch


def _two_adapters(model_dir, cfg, folder: Path) -> tuple[Path, Path]:
    """An adapter a run starts from (the reference; B not 0) and one it moved to."""
    import torch

    from qwen_mlx.backends.torch_model import add_lora, load_base
    from qwen_mlx.backends.torch_trainer import save_peft_adapter

    model = add_lora(load_base(model_dir, "none", torch.device("cpu")), cfg)
    generator = torch.Generator().manual_seed(0)
    for name, scale in (("start", 0.1), ("moved", 0.02)):
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key or (name == "moved" and "lora_" in key):
                    param.add_(torch.randn(param.shape, generator=generator) * scale)
        save_peft_adapter(model, folder / name)
    return folder / "start", folder / "moved"


def _torch_step(model_dir, cfg, rows, start: Path, moved: Path):
    import torch

    from qwen_mlx.backends.torch_model import add_lora, load_base, load_lora_weights
    from qwen_mlx.backends.torch_trainer import TorchHooks

    model = add_lora(load_base(model_dir, "none", torch.device("cpu")), cfg)
    hooks = TorchHooks(model, torch.device("cpu"), cfg, (0, 1))
    summary = _step(hooks, rows, lambda d: load_lora_weights(model, d), start, moved)
    grads = {  # under MLX's names and shapes: lora_a (in, r), lora_b (r, out)
        key.removeprefix("base_model.model.")
        .replace(".default.weight", "")
        .replace("lora_A", "lora_a")
        .replace("lora_B", "lora_b"): param.grad.numpy().T
        for key, param in model.named_parameters()
        if param.grad is not None
    }
    return summary, grads


def _mlx_step(model_dir, cfg, rows, start: Path, moved: Path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen_mlx.backends import mlx_model
    from qwen_mlx.backends.mlx_trainer import MLXHooks

    model, _ = mlx_model.load_base(model_dir, "none")
    mlx_model.add_lora(model, list(cfg.lora.target_modules), 8, 16, 0.0, 0)
    hooks = MLXHooks(model, cfg)
    summary = _step(hooks, rows, lambda d: mlx_model.load_peft_weights(model, d), start, moved)
    return summary, {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(hooks.grads)}


def _step(hooks, rows, load, start: Path, moved: Path) -> dict[str, float]:
    """References from ``start``, then one micro-step of the whole batch at ``moved``."""
    from qwen_mlx.loop import attach_reference
    from qwen_mlx.objectives import window_counts
    from qwen_mlx.tokens import collate

    load(start)
    attach_reference(hooks, rows, 2, 0)
    load(moved)
    batch = collate(rows, 0)
    counts = window_counts(hooks.objective, [batch])
    sums = hooks.micro_step(batch, {k: 1 / v for k, v in counts.items()}, sync=True)
    return hooks.objective.summarize(sums, counts)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_mlx_computes_what_torch_computes(objective, tiny_model_dir, pair_files, tmp_path):
    """The same adapter, pairs and reference: the same loss, rewards and LoRA gradients."""
    pytest.importorskip("mlx_lm")
    pytest.importorskip("torch")
    from qwen_mlx.run_data import build_run_data
    from qwen_mlx.tokens import load_tokenizer

    cfg = _config(tiny_model_dir, pair_files["train"], tmp_path, f"training.objective={objective}")
    adapters = _two_adapters(tiny_model_dir, cfg, tmp_path)
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = [build_run_data(cfg, tokenizer).train[:2] for _ in range(2)]
    torch_metrics, torch_grads = _torch_step(tiny_model_dir, cfg, rows[0], *adapters)
    mlx_metrics, mlx_grads = _mlx_step(tiny_model_dir, cfg, rows[1], *adapters)
    for a, b in zip(*rows, strict=True):
        np.testing.assert_allclose(a.ref_logps, b.ref_logps, atol=1e-3, rtol=1e-5)
    for key, value in torch_metrics.items():
        assert mlx_metrics[key] == pytest.approx(value, abs=1e-4), key
    assert abs(torch_metrics["reward_margin"]) > 1e-3
    assert torch_grads.keys() == mlx_grads.keys() and torch_grads
    for key, grad in torch_grads.items():
        np.testing.assert_allclose(mlx_grads[key], grad, atol=1e-4, rtol=1e-3, err_msg=key)


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, pair_files, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sft") / "run"
    cfg = _config(
        tiny_model_dir,
        pair_files["sft"],
        run,
        "training.learning_rate=5e-3",
        "training.num_epochs=4",
    )
    start_run(cfg, "torch")
    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_from_an_sft_adapter_learns_held_out_preferences(
    backend, tiny_model_dir, pair_files, sft_run, tmp_path
):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    from qwen_mlx.training_run import adopt_adapter

    cfg = _config(
        tiny_model_dir,
        pair_files["train"],
        tmp_path / "dpo",
        "training.objective=dpo",
        f"training.from_adapter={sft_run}",
        f"data.valid_file={pair_files['held']}",
        "training.learning_rate=2e-3",
        "training.num_epochs=4",
    )
    assert adopt_adapter(cfg) is None  # the run's LoRA shape is the SFT adapter's
    start_run(cfg, backend)
    lines = metrics(tmp_path / "dpo")
    first = next(m for m in lines if m["type"] == "train")
    # The reference is the SFT model: before the first update the policy equals it.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_margin"] == 0.0
    held = [m for m in lines if m["type"] == "eval"]
    margins = [m["val_reward_margin"] for m in held]
    assert 0 < margins[0] < margins[-1], margins  # from 0 at the start, growing
    assert held[-1]["val_accuracy"] >= 0.75  # 6 of the 8 held-out pairs, chance being 4
    assert (tmp_path / "dpo" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_resume_is_bit_identical(
    backend, objective, tiny_model_dir, pair_files, tmp_path
):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    from safetensors.numpy import load_file

    common = (
        f"training.objective={objective}",
        "training.num_epochs=3",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=2",
        "lora.dropout=0.1",
        "training.learning_rate=1e-3",
    )
    straight = _config(tiny_model_dir, pair_files["train"], tmp_path / "a", *common)
    straight.training.max_steps = 6
    start_run(straight, backend)
    first = _config(tiny_model_dir, pair_files["train"], tmp_path / "b", *common)
    first.training.max_steps = 3
    start_run(first, backend)
    first.training.max_steps = 6
    start_run(first, backend, resume=True)
    a, b = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in "ab")
    assert a and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    train = [[m for m in metrics(tmp_path / r) if m["type"] == "train"] for r in "ab"]
    assert [m["loss"] for m in train[0]] == [m["loss"] for m in train[1]]
    assert len(train[0]) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_trains_on_a_four_bit_base(backend, tiny_model_dir, pair_files, tmp_path):
    if backend == "torch":
        pytest.importorskip("bitsandbytes")
    else:
        pytest.importorskip("mlx_lm")
    cfg = _config(
        tiny_model_dir,
        pair_files["train"],
        tmp_path / "q",
        "model.quantization=4bit",
        "training.objective=dpo",
        "training.learning_rate=5e-3",
        "training.num_epochs=3",
    )
    start_run(cfg, backend)
    train = [m for m in metrics(tmp_path / "q") if m["type"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert train[-1]["loss"] < 0.5 * train[0]["loss"] and train[-1]["accuracy"] > 0.5


def test_the_memory_estimate_counts_a_preference_row_as_two_sides(tiny_model_dir, pair_files):
    """A DPO row holds whole pairs (2 × max_seq_length tokens) and costs what an SFT row of
    that length costs (bench/preference.py measures it: BENCHMARKS.md)."""
    from qwen_mlx import memory
    from qwen_mlx.backends.base import DevicePlan

    plan = DevicePlan("cpu", "none", fp32=True, device_memory=None)
    dpo = _config(tiny_model_dir, pair_files["train"], "x", "training.objective=dpo")
    sft = _config(tiny_model_dir, pair_files["sft"], "x", "training.max_seq_length=512")
    assert memory.estimate_run(dpo, plan).parts == memory.estimate_run(sft, plan).parts
