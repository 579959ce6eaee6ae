"""The configuration's shape: one dataclass per section of config.yaml, presets, ranges.

The defaults below are the only place defaults live; they are the seed guide's "完整训练"
values. Reading a file, the layers (defaults ← ``config.yaml`` ← ``--preset`` ←
``--set key=value``), type and range checks and writing a run's config live in
:mod:`qwen_mlx.config_file`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    """A dataclass field with its help text (and allowed values) kept right beside it."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKING = (True, False, "auto", "bucketed")  # training.packing's values
# The row layout training.packing: auto picks where a run trains, from bench/train_mlx.py and
# bench/train_torch.py (packed, unpacked and bucketed in the same run; BENCHMARKS.md): on MLX
# and on torch's CPU path one-sample rows in length-sorted batches were fastest, at less
# memory; on a GPU, packed rows fill it (the H100 notes), so torch keeps them there.
AUTO_LAYOUT = {"mlx": "bucketed", "torch/cpu": "bucketed", "torch": "packed"}


@dataclass
class ModelConfig:
    path: str = _f(
        "models/Qwen/Qwen2.5-3B",
        "Local Hugging Face model folder (`qwen-mlx download REPO_ID` puts one here).",
    )
    quantization: str = _f(
        "4bit",
        "Precision of the frozen base while training: 4bit (QLoRA), 8bit or none.",
        choices=("4bit", "8bit", "none"),
    )


@dataclass
class DataConfig:
    train_file: str = _f(
        "data/报销细则_distilled_chunked.jsonl", "Training data (.jsonl/.json/.csv/.parquet)."
    )
    valid_file: str | None = _f(
        None, "Validation data; null splits `valid_ratio` off train_file (seeded)."
    )
    test_file: str | None = _f(None, "Held-out test data for `qwen-mlx eval`.")
    valid_ratio: float = _f(0.05, "Share of train_file used for validation when no valid_file.")
    system_prompt: str | None = _f(None, "System turn added to records that have none.")
    mask_prompt: bool = _f(True, "Compute the loss on assistant tokens only.")
    replay_file: str | None = _f(
        None,
        "The base model's own answers to general prompts (`qwen-mlx data replay`), mixed into "
        "training so the tuned model keeps its general ability.",
    )
    replay_ratio: float = _f(
        0.2, "Share of the training tokens taken from replay_file (0: none of it)."
    )


@dataclass
class LoraConfig:
    rank: int = _f(16, "LoRA rank r.")
    alpha: float = _f(32, "LoRA alpha; the update is scaled by alpha/rank on every backend.")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    # _f returns a dataclasses.field with a default_factory for lists, so this is safe.
    target_modules: list[str] = _f(ALL_LINEAR, "Linear layers that get a LoRA adapter.")  # noqa: RUF009


@dataclass
class TrainingConfig:
    backend: str = _f(
        "auto",
        "Trainer: auto (MLX on Apple Silicon, else PyTorch), mlx or torch.",
        choices=("auto", "mlx", "torch"),
    )
    objective: str = _f(
        "sft",
        "What the run learns from: sft (answers, token cross-entropy), dpo (preference pairs, "
        "DPO's sigmoid loss against the starting model as reference) or orpo (pairs, ORPO: "
        "NLL of the chosen answer plus an odds-ratio term; no reference).",
        choices=("sft", "dpo", "orpo"),
    )
    beta: float = _f(
        0.1,
        "dpo: DPO's beta (how far the model may move from the reference; TRL's default 0.1). "
        "orpo: the weight of the odds-ratio term (the paper's lambda; TRL's ORPOConfig.beta, "
        "LLaMA-Factory's pref_beta).",
    )
    from_adapter: str | None = _f(
        None,
        "Start from this run's (or adapter folder's) LoRA adapter instead of a new one, e.g. "
        "an SFT run before DPO; with dpo it is also the reference model.",
    )
    num_epochs: int = _f(3, "Passes over the training data.")
    learning_rate: float = _f(5e-5, "Peak learning rate (after warmup, cosine decay).")
    batch_size: int = _f(1, "Rows per optimizer micro-step.")
    gradient_accumulation_steps: int = _f(4, "Micro-steps per optimizer update.")
    warmup_steps: int = _f(30, "Linear warmup, in optimizer updates.")
    max_seq_length: int = _f(1024, "Tokens per row; longer samples are truncated (counted).")
    packing: bool | str = _f(
        "auto",
        "How samples are laid out: true packs several into rows of max_seq_length (attention "
        "kept per sample); false puts one sample in a row; bucketed too, and batches "
        "batch_size rows of similar length (mlx-lm's order); auto picks what measured "
        "fastest where the run trains: bucketed on MLX and on torch's CPU path, else true.",
    )
    seed: int = _f(42, "Seed for data split, order, LoRA init and dropout.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0: no clipping).")
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in the backward pass: less memory, about 30% slower."
    )
    checkpoint_fraction: float = _f(
        1.0,
        "With gradient_checkpointing: the share of decoder layers recomputed (selective "
        "checkpointing). Lower is faster and needs more memory; 1 recomputes every layer.",
    )
    attention: str = _f(
        "auto",
        "torch attention kernel: sdpa, or flex (PyTorch FlexAttention, CUDA only: skips the "
        "blocks that packing masks out); auto picks sdpa.",
        choices=("auto", "sdpa", "flex"),
    )
    kernels: str = _f(
        "auto",
        "torch fused kernels: liger (Liger Kernel's RMSNorm, SwiGLU, RoPE and fused "
        "linear + cross-entropy; CUDA, pip install liger-kernel) or none; auto picks none "
        "until Liger has been measured with QLoRA and packing on a GPU.",
        choices=("auto", "liger", "none"),
    )
    eval_every: int = _f(
        0, "Validation loss every N optimizer updates (0: about 10 times a run), and each epoch."
    )
    save_every: int = _f(
        0, "Checkpoint every N optimizer updates (0: about 5 times a run), and each epoch."
    )
    max_steps: int = _f(
        0,
        "Stop after N optimizer updates (0: all epochs). The schedule still spans every "
        "epoch, so a run stopped early resumes exactly where it was.",
    )


def row_length(training: TrainingConfig) -> int:
    """Tokens per training row: ``max_seq_length``, or twice that for preference objectives,
    whose rows hold whole pairs (each side up to max_seq_length, as TRL's max_length)."""
    return training.max_seq_length * (1 if training.objective == "sft" else 2)


def row_layout(training: TrainingConfig, where: str | None) -> str:
    """``packed``, ``unpacked`` or ``bucketed``: how ``training.packing`` lays samples out
    ``where`` the run trains (a key of AUTO_LAYOUT: ``mlx``, ``torch``, ``torch/cpu``;
    needed for ``auto`` only, the layout measured fastest there)."""
    packing = training.packing
    if packing == "auto":
        if where is None:
            raise ValueError("training.packing: auto needs the backend")
        backend = where.split("/")[0]
        # a device or backend not measured: its backend's layout, else packed rows
        return AUTO_LAYOUT.get(where, AUTO_LAYOUT.get(backend, "packed"))
    if packing == "bucketed":
        return "bucketed"
    return "packed" if packing else "unpacked"


def recomputed_layers(training: TrainingConfig, n_layers: int) -> int:
    """How many decoder layers (the first ones) recompute their activations in the backward
    pass (``training.gradient_checkpointing`` / ``checkpoint_fraction``)."""
    if not training.gradient_checkpointing:
        return 0
    return max(1, round(training.checkpoint_fraction * n_layers))


@dataclass
class OutputConfig:
    dir: str = _f("outputs/qwen2_5-3b-trained", "Run folder: adapter, checkpoints, metrics.")


@dataclass
class DistillConfig:
    teacher_url: str | None = _f(
        None, "`data distill`: the teacher's OpenAI-compatible URL, e.g. http://localhost:11434/v1."
    )
    teacher_model: str | None = _f(None, "`data distill`: the teacher's model name.")
    api_key_env: str = _f(
        "OPENAI_API_KEY",
        "Environment variable holding the teacher's key (a local teacher may have none).",
    )
    questions_per_chunk: int = _f(5, "Questions asked for each chunk.")
    chunk_tokens: int = _f(512, "Most tokens (of model.path's tokenizer) in one chunk.")
    test_ratio: float = _f(0.1, "Share of the distilled questions held out in test.jsonl.")
    followup_ratio: float = _f(
        0.05, "Share of kept questions that get a follow-up turn (a record with history)."
    )
    paraphrases: int = _f(
        2,
        "Rewordings the teacher writes for each kept training question (other words, another "
        "asker, colloquial or formal), each answered and checked like any question (0: none).",
    )
    unanswerable_ratio: float = _f(
        0.1,
        "Questions the documents do not answer, as a share of the questions asked: checked "
        "against the most similar chunks of all documents, answered with distill.refusal.",
    )
    refusal: str | None = _f(
        None,
        "The answer to an unanswerable question, with {topic} (null: in the documents' "
        "language, 细则未对{topic}作出规定，请咨询相关管理部门。 / The rules do not cover {topic}; "
        "please ask the office responsible.).",
    )
    concurrency: int = _f(4, "Teacher requests in flight at once.")
    max_requests: int = _f(0, "Stop after this many HTTP attempts, retries included (0: none).")
    prompts: str | None = _f(
        None, "YAML file overriding prompt templates (see distill/prompts.py)."
    )
    timeout: float = _f(120.0, "Seconds to wait for one teacher reply before retrying.")


@dataclass
class ChatConfig:
    enable_thinking: bool = _f(
        False,
        "Qwen3: eval, chat and serve let the model reason in a think block first. Off (for "
        "models tuned on data without reasoning), a reply starts after an empty think block, "
        "as such records are trained. Turn it on when the training data has reasoning.",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# The seed guide's three training blocks (轻量 / 完整 / 增强).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"training.num_epochs": 1, "training.learning_rate": 1e-4},
    "full": {"training.num_epochs": 3, "training.learning_rate": 5e-5},
    "enhanced": {
        "training.num_epochs": 5,
        "training.learning_rate": 3e-5,
        "lora.rank": 32,
        "lora.alpha": 64,
    },
}

# Range checks that the type alone cannot express: key -> (test, what is expected).
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.valid_ratio": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "data.replay_ratio": (lambda v: 0 <= v <= 0.9, "a number in [0, 0.9]"),
    "lora.rank": (lambda v: v >= 1, "an integer ≥ 1"),
    "lora.alpha": (lambda v: v > 0, "a number > 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "lora.target_modules": (lambda v: len(v) > 0, "a non-empty list of module names"),
    "training.num_epochs": (lambda v: v >= 1, "an integer ≥ 1"),
    "training.beta": (lambda v: v > 0, "a number > 0"),
    "training.learning_rate": (lambda v: v > 0, "a number > 0"),
    "training.batch_size": (lambda v: v >= 1, "an integer ≥ 1"),
    "training.packing": (lambda v: v in PACKING, "auto, bucketed, true or false"),
    "training.gradient_accumulation_steps": (lambda v: v >= 1, "an integer ≥ 1"),
    "training.warmup_steps": (lambda v: v >= 0, "an integer ≥ 0"),
    "training.max_seq_length": (lambda v: v >= 16, "an integer ≥ 16"),
    "training.max_grad_norm": (lambda v: v >= 0, "a number ≥ 0"),
    "training.eval_every": (lambda v: v >= 0, "an integer ≥ 0"),
    "training.save_every": (lambda v: v >= 0, "an integer ≥ 0"),
    "training.max_steps": (lambda v: v >= 0, "an integer ≥ 0"),
    "training.checkpoint_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "distill.questions_per_chunk": (lambda v: 1 <= v <= 50, "an integer in [1, 50]"),
    "distill.chunk_tokens": (lambda v: v >= 64, "an integer ≥ 64"),
    "distill.test_ratio": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "distill.followup_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "distill.paraphrases": (lambda v: 0 <= v <= 10, "an integer in [0, 10]"),
    "distill.unanswerable_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "distill.refusal": (lambda v: "{topic}" in v, "a text with {topic} in it"),
    "distill.concurrency": (lambda v: 1 <= v <= 256, "an integer in [1, 256]"),
    "distill.max_requests": (lambda v: v >= 0, "an integer ≥ 0"),
    "distill.timeout": (lambda v: v > 0, "a number > 0"),
}
