"""What every backend must do with every model family: one suite, run on each backend (mlx,
torch) and each family in ``FAMILIES`` (its tiny model), through the one run path.

Learning, the same curve on both backends, packing, the chunked loss, exact resume, a
PEFT-readable adapter, QLoRA and the family's stop tokens are the contract the loop and the
shared export rely on; a family's own attention (Qwen3's q/k norms and head_dim) must keep
packed samples apart and feed the chunked loss the same way. Each backend's own details
(MLX's compiled gradients and quantized layers, torch's DDP and speed options) are tested
beside it in test_mlx_backend.py and test_torch_backend.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from backend_helpers import mlx_lora_model
from lora_helpers import hf_logits
from repo_helpers import BUNDLED_TRAIN
from train_helpers import losses, run_config, start_run

from qwen_mlx.config import ALL_LINEAR
from qwen_mlx.config_file import load_config
from qwen_mlx.data import normalize
from qwen_mlx.tokens import collate, load_tokenizer, pack, unpacked
from qwen_mlx.tokens import encode_records as encode


@dataclass
class Subject:
    """One backend as the contract sees it: a LoRA model, its logits and its summed loss."""

    name: str
    module: Any  # the backend's model module (mlx_model, torch_model)
    lora_model: Any  # (model_dir, seed) -> model in fp32 with LoRA and a non-zero B
    logits: Any  # (model, ids, segment_ids or None) -> numpy logits
    loss: Any  # (model, collated batch) -> summed target loss
    peft_tolerance: float  # trained logits vs PEFT's from the saved adapter
    learns_to: float  # the last loss of the overfitting run, as a share of the first
    four_bit: tuple[str, ...]  # settings a 4-bit run learns with in a few epochs
    quantized: Any  # (trained model) -> whether its base layers are 4-bit


def _mlx() -> Subject:
    pytest.importorskip("mlx_lm")
    import mlx.core as mx

    from qwen_mlx.backends import mlx_model

    def logits(model, ids, segment_ids=None):
        model.set_dtype(mx.float32)  # bf16 base → fp32 is exact; LoRA weights are fp32
        if segment_ids is None:
            return np.array(model(mx.array(ids)))
        return np.array(mlx_model.logits(model, mx.array(ids), mx.array(segment_ids)))

    def loss(model, batch):
        return float(mlx_model.target_loss(model, *mlx_model.device_batch(batch)))

    def quantized(model):
        import mlx.nn as nn

        attention = model.model.layers[0].self_attn.q_proj.linear
        embedding = model.model.embed_tokens
        return isinstance(attention, nn.QuantizedLinear) and isinstance(
            embedding, nn.QuantizedEmbedding
        )

    four_bit = ("training.num_epochs=5", "training.learning_rate=1e-2")
    return Subject("mlx", mlx_model, mlx_lora_model, logits, loss, 1e-3, 0.65, four_bit, quantized)


def _torch() -> Subject:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from qwen_mlx.backends import torch_model

    def lora_model(model_dir, seed=0):
        cfg = load_config(None, None, [f"model.path={model_dir}", "lora.dropout=0"])
        base = torch_model.load_base(model_dir, "none", torch.device("cpu"))
        model = torch_model.add_lora(base, cfg)
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter
                param.data = torch.randn(param.shape, generator=generator) * 0.1
        return model.eval()

    def logits(model, ids, segment_ids=None):
        ids = torch.from_numpy(np.asarray(ids)).long()
        kwargs = {}
        if segment_ids is not None:  # packed: positions restart at each sample
            kwargs["position_ids"] = torch.from_numpy(_positions(segment_ids)).long()
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, **kwargs).logits.float().numpy()

    def loss(model, batch):
        keys = ("input_ids", "position_ids", "loss_mask")
        with torch.no_grad():
            return float(
                torch_model.TokenLoss(model)(*(torch.from_numpy(batch[k]).long() for k in keys))
            )

    def quantized(model):
        base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        return type(base).__name__ == "Linear4bit"  # bitsandbytes' NF4 layer

    four_bit = ("training.num_epochs=6", "training.learning_rate=1e-2")
    return Subject("torch", torch_model, lora_model, logits, loss, 1e-5, 0.6, four_bit, quantized)


def _positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position ids that restart at every sample of a packed row (segment 0 is padding)."""
    out = np.zeros_like(segment_ids)
    for row, segments in enumerate(segment_ids):
        for seg in np.unique(segments):
            where = np.flatnonzero(segments == seg)
            out[row, where] = np.arange(len(where))
    return out


@pytest.fixture(params=["mlx", "torch"])
def subject(request) -> Subject:
    return {"mlx": _mlx, "torch": _torch}[request.param]()


def train(subject: Subject, cfg, resume: bool = False):
    return start_run(cfg, subject.name, resume)


def adapter_weights(run_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_loss_falls_clearly_when_overfitting(subject, family, trained_runs):
    trained = trained_runs(subject.name, family.name, "overfit")
    run = trained.run
    curve = losses(run)
    assert curve[-1] < subject.learns_to * curve[0], curve
    assert len(losses(run, "eval")) >= 10
    assert (run / "loss.png").stat().st_size > 1000
    assert trained.result.adapter_dir == run / "adapter"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (run / "data" / "valid.jsonl").read_text().count("\n") == 2
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["tokens_per_s"] > 0 and first["peak_memory_gb"] > 0


def test_both_backends_learn_the_same_curve(family, trained_runs):
    pytest.importorskip("mlx_lm")
    pytest.importorskip("peft")
    runs = [trained_runs(backend, family.name, "short").run for backend in ("mlx", "torch")]
    mlx, torch = (losses(run) for run in runs)
    assert len(mlx) == len(torch) >= 10
    # Same base, data, mask and batches: the first loss (LoRA B starts at zero) is the same,
    # and the seeded A inits differ only enough to move later steps by a little (Qwen3's tiny
    # model by under 1%, Qwen2's by up to 2.1%).
    assert mlx[0] == pytest.approx(torch[0], rel=1e-4)
    np.testing.assert_allclose(mlx, torch, rtol=0.03)
    assert mlx[-1] < 0.85 * mlx[0] and torch[-1] < 0.85 * torch[0]


def test_packed_rows_equal_per_sample_logits_and_loss(subject, family_model_dir):
    model = subject.lora_model(family_model_dir)
    tokenizer = load_tokenizer(family_model_dir)
    records = [json.loads(x) for x in BUNDLED_TRAIN.read_text(encoding="utf-8").splitlines()[:5]]
    samples, _ = encode(tokenizer, [normalize(r)[0] for r in records], 1024)
    (row,) = pack(samples, sum(len(s) for s in samples) + 7, pad_id=0)  # one row, padded
    packed = subject.logits(model, row.input_ids[None], row.segment_ids[None])[0]
    segments = range(1, row.segment_ids.max() + 1)
    assert len(segments) == 5
    for seg in segments:
        where = np.flatnonzero(row.segment_ids == seg)
        alone = subject.logits(model, row.input_ids[where][None])[0]
        np.testing.assert_allclose(packed[where], alone, atol=1e-4, rtol=1e-4)
    single = sum(subject.loss(model, collate([r], 0)) for r in unpacked(samples, 0))
    assert subject.loss(model, collate([row], 0)) == pytest.approx(single, rel=1e-5)


def test_chunked_loss_equals_full_cross_entropy(subject, family_model_dir, monkeypatch):
    model = subject.lora_model(family_model_dir, seed=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 500, (2, 40)).astype(np.int32)
    mask = rng.integers(0, 2, (2, 40)).astype(np.int8)
    batch = {
        "input_ids": ids,
        "loss_mask": mask,
        "segment_ids": np.ones_like(ids),
        "position_ids": np.tile(np.arange(40, dtype=np.int32), (2, 1)),
    }
    monkeypatch.setattr(subject.module, "LOSS_CHUNK", 7)  # several chunks, the last partial
    chunked = subject.loss(model, batch)
    logits = subject.logits(model, ids).astype(np.float64)[:, :-1]
    targets = mask[:, 1:].astype(bool)
    chosen, labels = logits[targets], ids[:, 1:][targets]
    top = chosen.max(axis=1)
    full = np.log(np.exp(chosen - top[:, None]).sum(axis=1)) + top
    full -= chosen[np.arange(len(labels)), labels]
    assert chunked == pytest.approx(full.sum(), rel=1e-5)


def test_resume_gives_the_same_adapter_as_a_straight_run(
    subject, family_model_dir, small_data, tmp_path
):
    # Six epochs: at least six updates in every family's schedule (Qwen3's packs into fewer rows).
    common = ["training.num_epochs=6", "lora.dropout=0.1", "training.gradient_accumulation_steps=2"]
    straight = run_config(family_model_dir, small_data, tmp_path / "a", *common)
    straight.training.max_steps = 6
    train(subject, straight)
    first = run_config(family_model_dir, small_data, tmp_path / "b", *common)
    first.training.max_steps = 3
    train(subject, first)
    first.training.max_steps = 6  # what `--resume RUN --set training.max_steps=6` does
    train(subject, first, resume=True)
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert a and a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=1e-5, err_msg=key)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    assert len(losses(tmp_path / "a")) == 6


def test_peft_reproduces_the_trained_models_logits(subject, family, trained_runs):
    trained = trained_runs(subject.name, family.name, "short")
    model_dir, adapter = trained.model_dir, trained.run / "adapter"
    ids = np.random.default_rng(0).integers(5, 500, (1, 30))
    own = subject.logits(trained.model, ids)[0]
    theirs = hf_logits(model_dir, ids[0].tolist(), adapter)
    np.testing.assert_allclose(own, theirs, atol=subject.peft_tolerance, rtol=0)
    plain = hf_logits(model_dir, ids[0].tolist())
    assert np.abs(own - plain).max() > 1e-2  # the adapter matters
    config_json = json.loads((adapter / "adapter_config.json").read_text())
    assert (config_json["peft_type"], config_json["task_type"]) == ("LORA", "CAUSAL_LM")
    assert config_json["r"] == 8 and config_json["lora_alpha"] == 16
    assert sorted(config_json["target_modules"]) == sorted(ALL_LINEAR)
    key = "base_model.model.model.layers.1.mlp.down_proj"
    weights = adapter_weights(trained.run)
    assert weights[f"{key}.lora_A.weight"].shape == (8, 128)  # (r, in)
    assert weights[f"{key}.lora_B.weight"].shape == (64, 8)  # (out, r)
    # Its engine reads the adapter back: the trained model again.
    from qwen_mlx.backends import get_backend

    engine = get_backend(subject.name).engine(model_dir, adapter)
    np.testing.assert_allclose(subject.logits(engine.model, ids)[0], own, atol=1e-5, rtol=0)


def test_four_bit_path_trains(subject, family_model_dir, small_data, tmp_path):
    if subject.name == "torch":
        pytest.importorskip("bitsandbytes")
    extra = ("model.quantization=4bit", "training.eval_every=100", *subject.four_bit)
    cfg = run_config(family_model_dir, small_data, tmp_path / "run", *extra)
    _, model = train(subject, cfg)
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.8 * curve[0], curve
    assert subject.quantized(model)
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    assert f"{layer}.lora_A.weight" in adapter_weights(tmp_path / "run")


def test_engines_end_replies_at_the_familys_stop_tokens(
    subject, family, family_model_dir, tmp_path
):
    # Even where neither config.json nor generation_config.json names them.
    import shutil

    from qwen_mlx.backends import get_backend

    model = shutil.copytree(family_model_dir, tmp_path / "model")
    (model / "generation_config.json").unlink()
    config = json.loads((model / "config.json").read_text())
    del config["eos_token_id"]
    (model / "config.json").write_text(json.dumps(config))
    engine = get_backend(subject.name).engine(model)
    vocab = engine.tokenizer.get_vocab()
    assert family.stop_tokens and {vocab[token] for token in family.stop_tokens} <= engine.end_ids
