"""Preference accuracy on held-out pairs: does the tuned model prefer the chosen answers?

DPO's implicit reward of an answer is β·(log π(answer) − log π_ref(answer)): how much more
likely the tuned model makes it than its reference. Here π_ref is the same engine with its
adapter off (the same weights, no second copy), and log π is the summed log-probability of
the answer's tokens, teacher-forced, through the engine's scoring path (``Engine.score``,
which test loss uses). A pair counts as preferred where the chosen answer's reward is
strictly above the rejected one's (a tie is not: TRL's ``rewards/accuracies``); the margin
is the mean difference of the two. A model that learnt nothing from the pairs scores 0
accuracy and margin 0 (its reward is 0 everywhere), not 50%.

Pairs are read in every pair format qwen-mlx recognises (:mod:`qwen_mlx.data_prefs`: chosen /
rejected on alpaca, sharegpt, messages, TRL's prompt/chosen/rejected, as ``data pairs``
writes them): each side becomes the conversation it stands for, and the turns after the
prompt the two share are the scored answer (earlier assistant turns are context only).
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
class PairSamples:
    """A pair as two tokenized samples whose targets are the answers only."""

    chosen: Any  # qwen_mlx.conversation.Sample
    rejected: Any
    source: str


@dataclass
class Preference:
    accuracy: float  # share of pairs whose chosen answer has the higher reward, 0-100
    margin: float  # mean (chosen − rejected) of log π − log π_ref, in nats (β-free)
    chosen_reward: float  # mean β·(log π − log π_ref) of the chosen answers
    rejected_reward: float
    beta: float
    pairs: int
    skipped: int  # pairs longer than max_seq_length, left out

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
        }


# ---------------------------------------------------------------- reading pairs


# The keys of a pair's two answers, in each format (OpenAI's preference format last).
SIDES = (
    ("chosen", "rejected"),
    ("chosen_messages", "rejected_messages"),
    ("preferred_output", "non_preferred_output"),
)


def _sides(obj: dict) -> tuple[dict, dict]:
    """The chosen and the rejected record a pair stands for (as SFT records of its format:
    :func:`qwen_mlx.data_prefs.sft_record` reads the chosen side; the rejected side is the
    same pair with its two answers swapped)."""
    from qwen_mlx.data_prefs import sft_record

    swapped = dict(obj)
    for good, bad in SIDES:
        for key, value in ((good, obj.get(bad)), (bad, obj.get(good))):
            if value is None:
                swapped.pop(key, None)
            else:
                swapped[key] = value
    return sft_record(obj, "pair"), sft_record(swapped, "pair")


def _scored(messages: list[dict], start: int) -> list[dict]:
    """``messages`` with every assistant turn before ``start`` as context only."""
    return [
        {**m, "weight": 0} if i < start and m["role"] == "assistant" else m
        for i, m in enumerate(messages)
    ]


def read_pairs(path: Path, system_prompt: str | None = None) -> list[tuple[list, list, str]]:
    """``(chosen messages, rejected messages, file:line)`` of every pair of ``path``, the
    turns before the answers marked context only; anything else is one error line."""
    from qwen_mlx.data import read_raw
    from qwen_mlx.data_formats import normalize
    from qwen_mlx.data_prefs import preference_kind
    from qwen_mlx.data_tools import RecordError

    pairs = []
    for line, obj in read_raw(path):
        where = f"{path}:{line}"
        if preference_kind(obj) != "pair":
            raise UserError(
                f"{where}: not a preference pair (chosen/rejected): --pairs takes held-out "
                "pairs, e.g. from `qwen-mlx data pairs`"
            )
        try:
            chosen, rejected = (normalize(side, system_prompt)[0] for side in _sides(obj))
        except RecordError as err:
            raise UserError(f"{where}: {err}") from None
        a, b = chosen.get("messages"), rejected.get("messages")
        if not a or not b:
            raise UserError(f"{where}: a pair needs a conversation on both sides")
        start = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if start is None or start >= min(len(a), len(b)):
            raise UserError(f"{where}: chosen and rejected are the same; nothing to prefer")
        pairs.append((_scored(a, start), _scored(b, start), where))
    if not pairs:
        raise UserError(f"{path}: no preference pairs")
    return pairs


def encode_pairs(tokenizer: Any, pairs: list, max_seq_length: int) -> tuple[list, int]:
    """The pairs as :class:`PairSamples`; a pair longer than ``max_seq_length`` on either
    side is left out (counted): cut, its answers would not be compared whole."""
    from qwen_mlx.conversation import encode_chat

    out, skipped = [], 0
    for chosen, rejected, where in pairs:
        a, b = encode_chat(tokenizer, chosen), encode_chat(tokenizer, rejected)
        if max(len(a), len(b)) > max_seq_length:
            skipped += 1
            continue
        out.append(PairSamples(a, b, where))
    return out, skipped


# ---------------------------------------------------------------- measuring


def log_prob(engine, sample) -> float:
    """The summed log-probability of ``sample``'s target tokens (teacher-forced)."""
    loss, _ = engine.score([sample])
    return -loss


def measure(engine, samples: list[PairSamples], beta: float, skipped: int = 0) -> Preference:
    """Preference accuracy and margins of ``engine`` (tuned; its adapter off: the
    reference) on tokenized pairs."""
    chosen, rejected = [], []
    for pair in track(samples, description="preference accuracy", transient=True):
        tuned = [log_prob(engine, pair.chosen), log_prob(engine, pair.rejected)]
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
    )


def preference_accuracy(engine, path: Path, max_seq_length: int, run_config=None) -> Preference:
    """The tuned ``engine``'s preference accuracy on the pairs of ``path`` (β and the system
    prompt from ``run_config`` when it has them)."""
    system = run_config.data.system_prompt if run_config else None
    beta = getattr(getattr(run_config, "training", None), "beta", None) or DEFAULT_BETA
    samples, skipped = encode_pairs(engine.tokenizer, read_pairs(path, system), max_seq_length)
    if not samples:
        raise UserError(
            f"{path}: every pair is longer than max_seq_length={max_seq_length}; nothing to "
            "measure preference accuracy on"
        )
    return measure(engine, samples, beta, skipped)
