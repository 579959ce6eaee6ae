"""Preference accuracy on held-out pairs: does the tuned model prefer the chosen answers?

DPO's implicit reward of an answer is β·(log π(answer) − log π_ref(answer)): how much more
likely the tuned model makes it than its reference. Here π_ref is the same engine with its
adapter off (the same weights, no second copy), and log π is the summed log-probability of
the answer's tokens, teacher-forced, through the engine's scoring path (``Engine.score``,
which test loss uses). A pair counts as preferred where the chosen answer's reward is
strictly above the rejected one's (a tie is not: TRL's ``rewards/accuracies``); the margin
is the mean difference of the two. A model that learnt nothing from the pairs scores 0
accuracy and margin 0 (its reward is 0 everywhere), not 50%.

Pairs are read and tokenized exactly as DPO training reads them
(:func:`qwen_mlx.data_prefs.read_pair`, :func:`qwen_mlx.tokens.encode_pair`: every pair format
qwen-mlx recognises, ``data pairs``' output too; the answers are the scored tokens, earlier
assistant turns context only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import track

from qwen_mlx.errors import UserError

# DPO's β when the run's config names none (TRL's default): it scales the reported rewards,
# never the accuracy.
DEFAULT_BETA = 0.1


@dataclass
class Preference:
    accuracy: float  # share of pairs whose chosen answer has the higher reward, 0-100
    margin: float  # mean (chosen − rejected) of log π − log π_ref, in nats (β-free)
    chosen_reward: float  # mean β·(log π − log π_ref) of the chosen answers
    rejected_reward: float
    beta: float
    pairs: int
    skipped: int  # pairs longer than max_seq_length, left out
    reference: str = "base"  # π_ref: "base" (adapter off), else the adapter DPO started from

    @property
    def reward_margin(self) -> float:
        return self.beta * self.margin

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "margin": self.margin,
            "reward_margin": self.reward_margin,
            "chosen_reward": self.chosen_reward,
            "rejected_reward": self.rejected_reward,
            "beta": self.beta,
            "pairs": self.pairs,
            "skipped": self.skipped,
            "reference": self.reference,
        }


# ---------------------------------------------------------------- reading pairs


def read_pairs(path: Path, system_prompt: str | None = None) -> list[tuple[Any, str]]:
    """``(Pair, file:line)`` of every pair of ``path``, read as training reads pairs
    (:func:`qwen_mlx.data_prefs.read_pair`); anything else is one error line."""
    from qwen_mlx.data import read_raw
    from qwen_mlx.data_prefs import preference_kind, read_pair
    from qwen_mlx.data_tools import RecordError

    pairs = []
    for line, obj in read_raw(path):
        where = f"{path}:{line}"
        if isinstance(obj, RecordError):
            raise UserError(f"{where}: {obj}")
        if preference_kind(obj) != "pair":
            raise UserError(
                f"{where}: not a preference pair (chosen/rejected): --pairs takes held-out "
                "pairs, e.g. from `qwen-mlx data pairs`"
            )
        try:
            pair = read_pair(obj, system_prompt)
        except RecordError as err:
            raise UserError(f"{where}: {err}") from None
        if pair.identical:
            raise UserError(f"{where}: chosen and rejected are the same; nothing to prefer")
        pairs.append((pair, where))
    if not pairs:
        raise UserError(f"{path}: no preference pairs")
    return pairs


def encode_pairs(tokenizer: Any, pairs: list, max_seq_length: int) -> tuple[list, int]:
    """The pairs as :class:`qwen_mlx.tokens.PairSamples` (training's encoding: the answers
    are the targets); a pair longer than ``max_seq_length`` on either side is left out
    (counted): cut, its answers would not be compared whole."""
    from qwen_mlx.tokens import encode_pair

    out, skipped = [], 0
    for pair, _ in pairs:
        samples = encode_pair(tokenizer, pair)
        if max(len(samples.chosen), len(samples.rejected)) > max_seq_length:
            skipped += 1
            continue
        out.append(samples)
    return out, skipped


# ---------------------------------------------------------------- measuring


def log_prob(engine, sample) -> float:
    """The summed log-probability of ``sample``'s target tokens (teacher-forced)."""
    loss, _ = engine.score([sample])
    return -loss


def reference_adapter(run_config) -> Path | None:
    """The adapter a DPO run started from (``training.from_adapter``): its reference model,
    so also π_ref here; None where the reference is the base (a new adapter, SFT, ORPO)."""
    training = getattr(run_config, "training", None)
    if getattr(training, "objective", "sft") != "dpo" or not getattr(
        training, "from_adapter", None
    ):
        return None
    return Path(training.from_adapter)


def reference_log_probs(engine, samples: list) -> list[tuple[float, float]]:
    """(chosen, rejected) summed answer log-probs of each pair under ``engine`` as it is
    (adapter on): π_ref of a DPO run that started from an adapter."""
    return [
        (log_prob(engine, pair.chosen), log_prob(engine, pair.rejected))
        for pair in track(samples, description="reference log-probs", transient=True)
    ]


def measure(
    engine,
    samples: list,
    beta: float,
    skipped: int = 0,
    reference: list[tuple[float, float]] | None = None,
    reference_name: str = "base",
) -> Preference:
    """Preference accuracy and margins of ``engine`` (tuned) on tokenized pairs, against
    ``reference`` log-probs (:func:`reference_log_probs`), else its own adapter off."""
    chosen, rejected = [], []
    for i, pair in enumerate(track(samples, description="preference accuracy", transient=True)):
        tuned = [log_prob(engine, pair.chosen), log_prob(engine, pair.rejected)]
        if reference is not None:
            base = list(reference[i])
        else:
            with engine.adapter_disabled():
                base = [log_prob(engine, pair.chosen), log_prob(engine, pair.rejected)]
        chosen.append(tuned[0] - base[0])
        rejected.append(tuned[1] - base[1])
    n = len(samples)
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    return Preference(
        accuracy=100 * wins / n if n else 0.0,
        margin=sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n if n else 0.0,
        chosen_reward=beta * sum(chosen) / n if n else 0.0,
        rejected_reward=beta * sum(rejected) / n if n else 0.0,
        beta=beta,
        pairs=n,
        skipped=skipped,
        reference=reference_name,
    )


def pair_samples(tokenizer, path: Path, max_seq_length: int, run_config=None) -> tuple[list, int]:
    """The pairs of ``path`` tokenized (the run's system prompt added where one has none),
    and how many were left out as too long."""
    system = run_config.data.system_prompt if run_config else None
    samples, skipped = encode_pairs(tokenizer, read_pairs(path, system), max_seq_length)
    if not samples:
        raise UserError(
            f"{path}: every pair is longer than max_seq_length={max_seq_length}; nothing to "
            "measure preference accuracy on"
        )
    return samples, skipped


def preference_accuracy(
    engine,
    path: Path,
    max_seq_length: int,
    run_config=None,
    reference: list[tuple[float, float]] | None = None,
) -> Preference:
    """The tuned ``engine``'s preference accuracy on the pairs of ``path`` (β and the system
    prompt from ``run_config`` when it has them). π_ref: ``reference``'s log-probs (those of
    :func:`reference_adapter`, measured first by the caller), else the engine's adapter off."""
    beta = getattr(getattr(run_config, "training", None), "beta", None) or DEFAULT_BETA
    samples, skipped = pair_samples(engine.tokenizer, path, max_seq_length, run_config)
    name = str(reference_adapter(run_config)) if reference is not None else "base"
    return measure(engine, samples, beta, skipped, reference, name)
