"""Our DPO and ORPO equal TRL's: the same batch, adapter and β give the same loss, rewards and
gradients on the LoRA weights (fp32, within 1e-4), on torch and on MLX.

TRL is the reference implementation (a dev dependency for these tests only). DPO goes through
TRL's own ``DPOTrainer`` (its collator, its log-probs, its sigmoid loss, its PEFT reference:
the adapter the trainer was given, kept as a frozen copy). ORPO's trainer is experimental in
TRL and tokenizes its own way, so its ``get_batch_logps`` and ``odds_ratio_loss`` run on the
model's logits of the same batch; its NLL term is taken over the chosen answer's tokens, as
ours is (TRL's trainer also counts the prompt's).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
trl = pytest.importorskip("trl")

from qwen_mlx.config_file import load_config  # noqa: E402
from qwen_mlx.conversation import Sample  # noqa: E402
from qwen_mlx.loop import attach_reference  # noqa: E402
from qwen_mlx.tokens import PairSamples, collate, pack_pairs  # noqa: E402

BETA = 0.1
PAIRS = [
    ("出差的伙食补助怎么算？", "每天100元，按出差天数发放。", "凭餐费发票实报实销。"),
    ("发票抬头写什么？", "示例大学，并填写学校税号。", "写个人名字就可以。"),
    ("讲师在北京住宿每晚能报多少？", "550元以内据实报销。", "不限额，住多少报多少。"),
]


def _config(model_dir, objective: str):
    return load_config(
        None,
        None,
        [
            f"model.path={model_dir}",
            "model.quantization=none",
            f"training.objective={objective}",
            f"training.beta={BETA}",
            "lora.rank=8",
            "lora.alpha=16",
            "lora.dropout=0",
        ],
    )


def _peft_model(model_dir, cfg):
    """The tiny model with LoRA whose B is not 0 (an adapter that has learnt something)."""
    from qwen_mlx.backends.torch_model import add_lora, load_base

    model = add_lora(load_base(model_dir, "none", torch.device("cpu")), cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _move_adapter(model, seed: int = 1) -> None:
    """A training step's worth of change to the trained ("default") adapter only."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name and "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)


def _trl_dataset():
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
            for q, good, bad in PAIRS
        ]
    )


def _our_rows(trl_batch, pad_id: int):
    """TRL's padded batch (all chosen rows, then all rejected rows) as our pair rows: each
    pair's two sequences side by side in one packed row, targets = TRL's completion mask."""
    ids, attention, completion = (
        trl_batch[k].numpy() for k in ("input_ids", "attention_mask", "completion_mask")
    )
    n = len(ids) // 2

    def sample(i: int) -> Sample:
        keep = attention[i].astype(bool)
        return Sample(ids[i][keep].tolist(), completion[i][keep].tolist())

    pairs = [PairSamples(sample(i), sample(n + i)) for i in range(n)]
    return pack_pairs(pairs, 4096, pad_id, packing=True)


def _lora_grads(model) -> dict[str, np.ndarray]:
    return {
        name: param.grad.detach().numpy().copy()
        for name, param in model.named_parameters()
        if param.grad is not None
    }


def _assert_same_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, grad in theirs.items():
        np.testing.assert_allclose(ours[name], grad, atol=1e-4, rtol=1e-4, err_msg=name)
    assert any(np.abs(g).max() > 1e-3 for g in theirs.values())  # the test can tell


@pytest.fixture
def dpo_setup(tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL's DPOTrainer on a PEFT model, our torch hooks on the very same model, and TRL's
    collated batch of the pairs as our rows with reference log-probs attached."""
    from trl import DPOConfig, DPOTrainer

    from qwen_mlx.backends.torch_trainer import TorchHooks

    cfg = _config(tiny_model_dir, "dpo")
    model = _peft_model(tiny_model_dir, cfg)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=BETA,
        loss_type=["sigmoid"],
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(PAIRS),
        max_length=512,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=_trl_dataset(), processing_class=tiny_tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    hooks = TorchHooks(model, torch.device("cpu"), cfg, (0, 1))
    rows = _our_rows(batch, tiny_tokenizer.pad_token_id)
    attach_reference(hooks, rows, batch_size=4, pad_id=0)  # before the adapter moves
    _move_adapter(model)
    return trainer, batch, hooks, rows


def test_dpo_loss_rewards_and_gradients_equal_trls(dpo_setup):
    trainer, batch, hooks, rows = dpo_setup
    model = hooks.model
    model.train()
    theirs_loss = trainer.compute_loss(model, batch)
    theirs_loss.backward()
    theirs = _lora_grads(model)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    model.zero_grad(set_to_none=True)

    sums = hooks.micro_step(collate(rows, 0), {"pairs": 1 / len(PAIRS)}, sync=True)
    summary = hooks.objective.summarize(sums, {"pairs": len(PAIRS)})
    assert summary["loss"] == pytest.approx(float(theirs_loss), abs=1e-5)
    assert summary["reward_chosen"] == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert summary["reward_rejected"] == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert summary["accuracy"] == pytest.approx(metrics["rewards/accuracies"])
    assert abs(summary["reward_margin"]) > 1e-3  # the moved adapter is not the reference
    _assert_same_grads(_lora_grads(model), theirs)


def _orpo_trl_loss(model, batch, beta: float):
    """TRL's ORPO on a padded batch: its log-probs and odds-ratio loss, the NLL over the chosen
    answer tokens (mean, as TRL's cross-entropy over the labels it is given)."""
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    n = len(labels) // 2
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    nll = torch.nn.functional.cross_entropy(
        logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1)
    )
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=logits.device))
    losses, chosen, rejected, ratio, _ = ORPOTrainer.odds_ratio_loss(fake, logps[:n], logps[n:])
    return nll - losses.mean(), nll, chosen, rejected, ratio


def test_orpo_loss_rewards_and_gradients_equal_trls(dpo_setup, tiny_model_dir):
    from qwen_mlx.backends.torch_trainer import TorchHooks
    from qwen_mlx.objectives import ORPO

    _, batch, dpo_hooks, rows = dpo_setup
    model = dpo_hooks.model
    model.train()
    loss, nll, chosen, rejected, ratio = _orpo_trl_loss(model, batch, BETA)
    loss.backward()
    theirs = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    hooks = TorchHooks(model, torch.device("cpu"), _config(tiny_model_dir, "orpo"), (0, 1))
    ours = collate(rows, 0)
    counts = ORPO(BETA).counts(ours)
    assert counts["tokens"] == int(batch["completion_mask"][: len(PAIRS), 1:].sum())
    sums = hooks.micro_step(ours, {k: 1 / v for k, v in counts.items()}, sync=True)
    summary = hooks.objective.summarize(sums, counts)
    assert summary["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert summary["nll"] == pytest.approx(float(nll), abs=1e-5)
    assert summary["log_odds_ratio"] == pytest.approx(float(ratio), abs=1e-5)
    assert summary["reward_chosen"] == pytest.approx(float(chosen.mean()), abs=1e-5)
    assert summary["reward_rejected"] == pytest.approx(float(rejected.mean()), abs=1e-5)
    _assert_same_grads(_lora_grads(model), theirs)
