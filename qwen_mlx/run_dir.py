"""The run folder contract: what ``train`` writes and ``eval``, ``export`` and
``--resume`` read, named in one place.

``outputs/<run>/`` holds the resolved ``config.yaml``, ``adapter/`` (PEFT format),
``checkpoints/``, ``metrics.jsonl``, ``loss.png`` and ``data/`` (the validation and test
records the run used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_CONFIG = "config.yaml"
ADAPTER, CHECKPOINTS, METRICS, DATA = "adapter", "checkpoints", "metrics.jsonl", "data"
# What only a training run folder holds (a user's project folder has config.yaml too).
RUN_PARTS = (RUN_CONFIG, ADAPTER, CHECKPOINTS, METRICS)


@dataclass(frozen=True)
class RunDir:
    """One run folder; the properties are its parts' paths (they need not exist yet)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def valid_data(self) -> Path:
        return self.path / DATA / "valid.jsonl"

    @property
    def test_data(self) -> Path:
        return self.path / DATA / "test.jsonl"

    def has_run(self) -> bool:
        """Whether a run has already trained here (so a new one must not start)."""
        return self.adapter.exists() or self.checkpoints.exists()

    def __str__(self) -> str:
        return str(self.path)
