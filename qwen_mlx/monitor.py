"""What a training run shows and records: progress bar, metrics.jsonl, loss.png, warnings.

The seed guide's advice on reading the loss ("steadily falling: good; fluctuating a lot:
learning rate too high; not falling: data or config problem") is turned into warnings
printed while training runs. NaN/inf is not a warning: the loop stops on it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from qwen_mlx.fsutil import atomic_path, disk_errors


class MetricsLog:
    """Appends one JSON line per logged step to ``metrics.jsonl`` (kept across resumes)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            self._truncate_after(resume_step)
        elif path.exists():
            path.unlink()

    def _truncate_after(self, step: int) -> None:
        # Lines logged after the checkpoint we resume from will be logged again.
        keep = [json.dumps(m) for m in self.read() if m.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def write(self, **fields: Any) -> None:
        with disk_errors(self.path), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(fields) + "\n")

    def read(self) -> list[dict]:
        """Every complete line; one torn by a kill or a full disk is left out."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def plot_loss(metrics: list[dict], out: Path) -> bool:
    """Write the training/validation loss curve; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(m["step"], m["loss"]) for m in metrics if m.get("type") == "train"]
    valid = [(m["step"], m["val_loss"]) for m in metrics if m.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


class LossWatch:
    """Turns the loss history into the seed's advice; each warning is given once."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total, self.warmup = total_steps, warmup_steps
        self.history: list[float] = []
        self.recent: deque[float] = deque(maxlen=20)
        self.ema: float | None = None
        self.given: set[str] = set()

    def update(self, step: int, loss: float) -> list[str]:
        self.history.append(loss)
        self.recent.append(loss)
        out = []
        if self.ema is not None and step > self.warmup and loss > 2.5 * self.ema:
            out.append(
                self._once(
                    "spike",
                    f"loss spiked to {loss:.3f} at step {step} (smoothed "
                    f"{self.ema:.3f}); if it keeps happening, lower training.learning_rate",
                )
            )
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if len(self.recent) == self.recent.maxlen and step > self.warmup:
            # Step-to-step jumps relative to the level: a steady decline is not "noise".
            values = list(self.recent)
            jumps = sum(abs(a - b) for a, b in itertools.pairwise(values))
            level = sum(values) / len(values)
            if level > 0 and jumps / (len(values) - 1) / level > 0.3:
                out.append(
                    self._once(
                        "noisy",
                        "loss fluctuates strongly: the learning rate is "
                        "probably too high; try half of training.learning_rate",
                    )
                )
        if step >= max(self.warmup + 10, self.total // 3) and len(self.history) >= 20:
            tenth = max(5, len(self.history) // 10)
            first = sum(self.history[:tenth]) / tenth
            last = sum(self.history[-tenth:]) / tenth
            if last > 0.98 * first:
                out.append(
                    self._once(
                        "flat",
                        f"loss is not falling ({first:.3f} → {last:.3f}): "
                        "check the data format (`qwen-mlx data stats`) and the learning rate",
                    )
                )
        return [w for w in out if w]

    def _once(self, key: str, text: str) -> str:
        if key in self.given:
            return ""
        self.given.add(key)
        return text


def progress_bar(console: Console) -> Progress:
    """The training progress bar: epoch, step/total, loss, lr, tokens/s, peak memory, ETA."""
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("{task.fields[mem]}"),
        TimeRemainingColumn(),
        console=console,
    )
