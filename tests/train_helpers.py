"""Shared by the trainer tests: a small training file, a short-run config, starting a run
quietly, metrics readers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from repo_helpers import BUNDLED_TRAIN
from rich.console import Console

from qwen_mlx.backends import get_backend
from qwen_mlx.backends.base import TrainResult
from qwen_mlx.config import Config
from qwen_mlx.config_file import load_config

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (lives for the test session)


class _Recording:
    """A backend that remembers the hooks its trainer built, so tests see the model."""

    def __init__(self, backend):
        self.backend, self.hooks = backend, None

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def trainer(self, cfg: Config, plan):
        self.hooks = self.backend.trainer(cfg, plan)
        return self.hooks


def start_run(
    cfg: Config, backend: str, resume: bool = False, console: Console = QUIET
) -> tuple[TrainResult, Any]:
    """``training_run.train`` on ``backend`` into ``cfg.output.dir``: (result, the trained
    model in eval mode)."""
    from qwen_mlx import training_run

    cfg.training.backend = backend
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recording = _Recording(get_backend(backend))
    with mock.patch.object(training_run, "get_backend", lambda name: recording):
        result = training_run.train(cfg, run_dir, resume, console)
    return result, recording.hooks.model.eval()


def write_short_records(path: Path, n: int = 12) -> Path:
    """The ``n`` bundled records with the shortest answers, as a JSONL training file."""
    rows = [json.loads(line) for line in BUNDLED_TRAIN.read_text(encoding="utf-8").splitlines()]
    rows = sorted(rows, key=lambda r: len(r["output"]))[:n]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def run_config(model_dir, data, run_dir, *extra: str) -> Config:
    """A short LoRA run on the tiny model that visibly learns (lr 5e-3, rank 8)."""
    return load_config(
        None,
        None,
        [
            f"model.path={model_dir}",
            "model.quantization=none",
            f"data.train_file={data}",
            "data.valid_ratio=0.2",
            f"output.dir={run_dir}",
            "training.max_seq_length=256",
            "training.batch_size=2",
            "training.gradient_accumulation_steps=1",
            "training.warmup_steps=2",
            "training.learning_rate=5e-3",
            "lora.rank=8",
            "lora.alpha=16",
            *extra,
        ],
    )


# The shared runs of the contract suite (``trained_runs`` in conftest.py), by name: settings
# over ``run_config``. "overfit": 12 epochs at lr 8e-3, so every family's tiny model learns
# clearly; "short": 6 epochs, as both backends must still agree step by step. No dropout and
# one row layout (training.packing: auto differs by backend), so both backends see the same
# batches and masks.
RUNS = {
    "overfit": ("training.num_epochs=12", "training.learning_rate=8e-3", "lora.dropout=0"),
    "short": ("training.num_epochs=6", "lora.dropout=0", "training.packing=true"),
}


@dataclass
class Trained:
    """A finished run: its folder, its base model, what ``train`` returned, the trained model."""

    run: Path
    model_dir: Path
    result: TrainResult
    model: Any


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, kind: str = "train") -> list[float]:
    key = "loss" if kind == "train" else "val_loss"
    return [m[key] for m in metrics(run_dir) if m["type"] == kind]


def logged_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in metrics(run_dir) if m["type"] == "train"]
