"""General drift: how far tuning moved the model away from its base outside the domain.

The base model (the tuned engine with its adapter off: the same weights, no second copy)
answers held-out general prompts greedily; then the tuned model and its base both read
those answers, teacher-forced (no generation), and the drift is the mean per-token KL
divergence KL(base ‖ tuned) over the answer tokens, in nats. It is 0 where tuning left the
model's general behaviour untouched and grows as the model forgets; replay
(``data.replay_file``), fewer epochs or a lower LoRA rank bring it down. A GGUF has no
adapter to switch off, so it is not measured there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from qwen_mlx.backends.base import GenerationSettings

# Above this many nats per token, eval warns (a heuristic for Qwen-size models: a tuned
# model that still writes its base's general answers stays well below it).
HIGH_DRIFT = 0.3
HIGH_DRIFT_FIX = (
    "mix the base's own answers in (`qwen-mlx data replay`, then data.replay_file), train "
    "fewer epochs, or lower lora.rank"
)


@dataclass
class Drift:
    kl_per_token: float
    tokens: int
    prompts: int

    def as_dict(self) -> dict:
        return {"kl_per_token": self.kl_per_token, "tokens": self.tokens, "prompts": self.prompts}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(base_logits: np.ndarray, tuned_logits: np.ndarray) -> np.ndarray:
    """KL(base ‖ tuned) at each position (rows of logits over the vocabulary), in nats."""
    base = log_softmax(base_logits.astype(np.float64))
    tuned = log_softmax(tuned_logits.astype(np.float64))
    return (np.exp(base) * (base - tuned)).sum(axis=-1)


def base_answers(
    engine,
    prompts: list,
    max_tokens: int,
    temperature: float = 0.0,
    batch_size: int | None = None,
) -> list[dict]:
    """Records of ``prompts`` (:class:`qwen_mlx.replay.Prompt`) answered by the base
    (``engine`` with its adapter off; greedy unless ``temperature``), ``batch_size`` at a time
    as eval answers; an answer cut off at ``max_tokens`` is kept as far as it went (drift is
    measured on the tokens, not on whole answers)."""
    from qwen_mlx.inference import answer_all
    from qwen_mlx.reasoning import split_reply

    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature)
    records: list[dict] = [{} for _ in prompts]
    with engine.adapter_disabled():
        replies = answer_all(engine, [p.messages for p in prompts], settings, batch_size)
        for i, reply in track(
            replies, total=len(prompts), description="answering (base, general)", transient=True
        ):
            answer = split_reply(reply.text, engine.family.think_tags)[1]
            turn = {"role": "assistant", "content": answer}
            records[i] = {"messages": [*prompts[i].messages, turn]}
    return records


def measure(engine, records: list[dict], max_seq_length: int) -> Drift:
    """The tuned model's drift from its base on ``records`` (conversations whose answers are
    the base's own)."""
    from qwen_mlx.tokens import encode_records

    samples, _ = encode_records(engine.tokenizer, records, max_seq_length)
    total, count = 0.0, 0
    for sample in track(samples, description="general drift", transient=True):
        tuned = engine.target_logits(sample)
        with engine.adapter_disabled():
            base = engine.target_logits(sample)
        total += float(kl_divergence(base, tuned).sum())
        count += len(tuned)
    return Drift(total / max(count, 1), count, len(records))


def general_drift(
    engine,
    prompts_file: Path | None,
    n: int,
    max_tokens: int,
    max_len: int,
    batch_size: int | None = None,
):
    """The drift of a tuned ``engine`` on ``n`` held-out general prompts (the bundled set's
    held-out part unless ``prompts_file``), or None where it cannot be measured."""
    from qwen_mlx.replay import HELDOUT, general_prompts, load_prompts, pick

    if n <= 0 or not engine.has_adapter or engine.tokenizer is None:
        return None
    path = prompts_file or general_prompts()
    prompts = pick(load_prompts(path, None if prompts_file else HELDOUT), n, seed=0)
    answers = base_answers(engine, prompts, max_tokens, batch_size=batch_size)
    return measure(engine, answers, max_len)
