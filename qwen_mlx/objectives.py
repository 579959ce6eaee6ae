"""Training objectives: what the one shared loop minimises — SFT, DPO or ORPO.

``training.objective`` picks one (:func:`build`); the loop (:mod:`qwen_mlx.loop`) and the
backend's hooks both ask it, the way mlx-lm's trainer takes its ``loss=``: the loop for the
denominators of an accumulation window (:meth:`Objective.counts`) and the metrics of summed
values (:meth:`Objective.summarize`), the hooks for the loss of a batch
(:meth:`Objective.loss`). The math is written once, over whatever array type the backend
computes in (torch tensors, MLX arrays): the few functions it needs beyond arithmetic come
in an :class:`Ops`, which each trainer fills with its own.

- **sft**: summed cross-entropy of the target tokens; the window's loss is its mean per
  target token (the backend computes the sum its fastest way, fused kernels included).
- **dpo** (Rafailov et al., 2023; TRL's ``sigmoid`` loss): per pair,
  ``-log σ(β·((π_c − ref_c) − (π_r − ref_r)))`` with ``π`` the summed log-probability of an
  answer's tokens. The window's loss is the mean over its pairs, whatever their lengths.
  Rewards ``β·(π − ref)``; accuracy: the share of pairs whose chosen reward is strictly
  higher (TRL's ``rewards/accuracies``). The reference log-probs come with the rows.
- **orpo** (Hong et al., 2024; TRL's ``ORPOTrainer``): the chosen answers' NLL as a mean over
  the window's chosen answer tokens, minus ``β·log σ(log odds)`` as a mean over its pairs,
  where the odds use each answer's mean token log-prob. ``β`` is the paper's λ. No reference.

Rows of pairs hold each pair as two consecutive segments (chosen ``2k-1``, rejected ``2k``;
:func:`qwen_mlx.tokens.pack_pairs`); :func:`pair_layout` finds them from the segment ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from qwen_mlx.config import TrainingConfig

Array = Any  # a torch tensor or an MLX array


class Ops(NamedTuple):
    """The array functions the objectives need beyond arithmetic, from one backend."""

    log_sigmoid: Callable[[Array], Array]
    log1p: Callable[[Array], Array]
    exp: Callable[[Array], Array]
    expm1: Callable[[Array], Array]
    log: Callable[[Array], Array]
    where: Callable[[Array, Array, Array], Array]
    detach: Callable[[Array], Array]  # no gradient flows back through the result
    to_float: Callable[[Array], Array]  # a boolean array as 0.0 / 1.0


@dataclass
class PairInputs:
    """Per-pair arrays of one batch, shape (pairs,): the policy's summed answer log-probs,
    the answers' token counts, the reference's log-probs and a weight (1 a pair, 0 the
    padding a backend adds for fixed shapes)."""

    chosen: Array
    rejected: Array
    chosen_tokens: Array
    rejected_tokens: Array
    ref_chosen: Array
    ref_rejected: Array
    weight: Array


def pair_inputs(logps: Array, tokens: Array, ref: Array, weight: Array) -> PairInputs:
    """Per-sample arrays (chosen, rejected, chosen, …) split into a pair's two sides."""
    return PairInputs(
        logps[0::2], logps[1::2], tokens[0::2], tokens[1::2], ref[0::2], ref[1::2], weight
    )


@dataclass
class PairLayout:
    """Where the samples of a batch of pair rows are: per target token (in row-major order,
    as both trainers gather them) the sample it belongs to, and per sample its target count
    and reference log-prob; padded to ``len(weight) * 2`` samples."""

    sample_of_target: np.ndarray  # (targets,) int
    samples: int  # real samples (twice the pairs)
    tokens: np.ndarray  # (padded samples,) float32; 1 for padding (never divides by 0)
    ref: np.ndarray  # (padded samples,) float32; 0 where the batch has none
    weight: np.ndarray  # (padded pairs,) float32

    @property
    def pairs(self) -> int:
        return self.samples // 2


def samples_per_row(batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch["segment_ids"].max(axis=1)


def pair_layout(batch: dict[str, np.ndarray], pad_pairs_to: int = 1) -> PairLayout:
    """The :class:`PairLayout` of a collated batch of pair rows; the pair count is rounded up
    to a multiple of ``pad_pairs_to`` (MLX compiles one graph per shape)."""
    segments, mask = batch["segment_ids"], batch["loss_mask"][:, 1:]
    per_row = samples_per_row(batch)
    offset = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    rows, cols = np.nonzero(mask)
    sample = offset[rows] + segments[rows, cols + 1] - 1
    count = int(per_row.sum())
    pairs = count // 2
    padded = -(-max(pairs, 1) // pad_pairs_to) * pad_pairs_to
    tokens = np.ones(2 * padded, dtype=np.float32)
    tokens[:count] = np.bincount(sample, minlength=count)
    ref = np.zeros(2 * padded, dtype=np.float32)
    if "ref_logps" in batch:
        ref[:count] = np.concatenate(
            [r[:n] for r, n in zip(batch["ref_logps"], per_row, strict=True)]
        )
    weight = np.zeros(padded, dtype=np.float32)
    weight[:pairs] = 1.0
    return PairLayout(sample.astype(np.int64), count, tokens, ref, weight)


class SFT:
    """Token cross-entropy on the targets (the backend passes their summed loss)."""

    name = "sft"
    pairs = False
    reference = False
    sums = ("loss",)

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def counts(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        return {"tokens": int(batch["loss_mask"][:, 1:].sum())}

    def loss(self, ops: Ops, token_loss: Array, scales: dict[str, Any]):
        return token_loss * scales["tokens"], {"loss": token_loss}

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(counts["tokens"], 1.0)}


class DPO(SFT):
    """DPO's sigmoid loss against reference log-probs (see the module docstring)."""

    name = "dpo"
    pairs = True
    reference = True
    sums = ("loss", "reward_chosen", "reward_rejected", "correct")

    def counts(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        return {"pairs": int(samples_per_row(batch).sum()) // 2}

    def loss(self, ops: Ops, x: PairInputs, scales: dict[str, Any]):
        chosen = x.chosen - x.ref_chosen
        rejected = x.rejected - x.ref_rejected
        losses = -ops.log_sigmoid(self.beta * (chosen - rejected))
        sums = _reward_sums(ops, x.weight, self.beta * chosen, self.beta * rejected)
        sums["loss"] = (losses * x.weight).sum()
        return sums["loss"] * scales["pairs"], sums

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        pairs = max(counts["pairs"], 1.0)
        return {"loss": sums["loss"] / pairs, **_reward_metrics(sums, pairs)}


def _reward_sums(ops: Ops, weight: Array, chosen: Array, rejected: Array) -> dict[str, Array]:
    chosen, rejected = ops.detach(chosen), ops.detach(rejected)
    return {
        "reward_chosen": (chosen * weight).sum(),
        "reward_rejected": (rejected * weight).sum(),
        "correct": (ops.to_float(chosen > rejected) * weight).sum(),
    }


def _reward_metrics(sums: dict[str, float], pairs: float) -> dict[str, float]:
    chosen, rejected = sums["reward_chosen"] / pairs, sums["reward_rejected"] / pairs
    return {
        "reward_chosen": chosen,
        "reward_rejected": rejected,
        "reward_margin": chosen - rejected,
        "accuracy": sums["correct"] / pairs,
    }


def log1mexp(ops: Ops, x: Array) -> Array:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both sides of −ln 2 (Mächler, 2012)."""
    return ops.where(x < -math.log(2), ops.log1p(-ops.exp(x)), ops.log(-ops.expm1(x)))


class ORPO(SFT):
    """ORPO: chosen NLL plus β × the odds-ratio term (see the module docstring)."""

    name = "orpo"
    pairs = True
    reference = False
    sums = ("nll", "odds", "reward_chosen", "reward_rejected", "correct")

    def counts(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        layout = pair_layout(batch)
        return {"tokens": int(layout.tokens[0 : layout.samples : 2].sum()), "pairs": layout.pairs}

    def loss(self, ops: Ops, x: PairInputs, scales: dict[str, Any]):
        # Padding pairs get a mean log-prob of −1, so their (weight-0) terms stay finite.
        pad = (1.0 - x.weight) * -1.0
        chosen = x.chosen / x.chosen_tokens + pad
        rejected = x.rejected / x.rejected_tokens + pad
        log_odds = (chosen - rejected) - (log1mexp(ops, chosen) - log1mexp(ops, rejected))
        sums = _reward_sums(ops, x.weight, self.beta * chosen, self.beta * rejected)
        sums["nll"] = -(x.chosen * x.weight).sum()
        sums["odds"] = (ops.log_sigmoid(log_odds) * x.weight).sum()
        scaled = sums["nll"] * scales["tokens"] - self.beta * sums["odds"] * scales["pairs"]
        return scaled, sums

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        pairs = max(counts["pairs"], 1.0)
        nll, odds = sums["nll"] / max(counts["tokens"], 1.0), sums["odds"] / pairs
        return {
            "loss": nll - self.beta * odds,
            "nll": nll,
            "log_odds_ratio": odds,
            **_reward_metrics(sums, pairs),
        }


OBJECTIVES: dict[str, type[SFT]] = {"sft": SFT, "dpo": DPO, "orpo": ORPO}
Objective = SFT  # the interface every objective has (SFT is the plainest)


def build(training: TrainingConfig) -> SFT:
    """The objective ``training.objective`` names, with its ``beta``."""
    return OBJECTIVES[training.objective](training.beta)


def window_counts(objective: SFT, window: list[dict[str, np.ndarray]]) -> dict[str, int]:
    """The objective's denominators summed over an accumulation window's batches."""
    total: dict[str, int] = {}
    for batch in window:
        for key, value in objective.counts(batch).items():
            total[key] = total.get(key, 0) + value
    return total


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    for key, value in sums.items():
        total[key] = total.get(key, 0.0) + value
    return total
