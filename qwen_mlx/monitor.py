"""What a training run shows and records: progress bar, metrics.jsonl, loss.png, warnings.

The loop talks to one reporter object: :class:`RunReporter` on rank 0, which shows and
writes all of it (checkpoints too), and :class:`SilentReporter` on every other rank.

Preference runs (DPO, ORPO) also show and record the objective's reward metrics: the reward
margin (chosen − rejected) and preference accuracy on the progress line, every metric in
metrics.jsonl (``reward_chosen``, ``reward_rejected``, ``reward_margin``, ``accuracy``, and
ORPO's ``nll``, ``log_odds_ratio``; ``val_…`` on validation lines), and loss.png gets a
second panel with the margin and accuracy.

The seed guide's advice on reading the loss ("steadily falling: good; fluctuating a lot:
learning rate too high; not falling: data or config problem") is turned into warnings
printed while training runs. NaN/inf is not a warning: the loop stops on it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
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

from qwen_mlx import checkpoints
from qwen_mlx.checkpoints import LoopState
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import atomic_path, disk_errors
from qwen_mlx.run_dir import RunDir


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


def _curve(metrics: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in metrics if m.get("type") == kind and key in m]


def _plot_rewards(ax, metrics: list[dict]) -> None:
    """The preference panel: reward margin (left axis) and accuracy (right axis)."""
    for kind, key, style, label in (
        ("train", "reward_margin", "-", "reward margin"),
        ("eval", "val_reward_margin", "o-", "validation reward margin"),
    ):
        if points := _curve(metrics, kind, key):
            ax.plot(*zip(*points, strict=True), style, label=label, linewidth=1)
    ax.set_ylabel("reward margin")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    for kind, key, style, label in (
        ("train", "accuracy", "-", "accuracy"),
        ("eval", "val_accuracy", "s--", "validation accuracy"),
    ):
        if points := _curve(metrics, kind, key):
            right.plot(*zip(*points, strict=True), style, color="tab:green", label=label, lw=1)
    right.set_ylabel("preference accuracy")
    right.set_ylim(-0.02, 1.02)
    lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize="small")


def plot_loss(metrics: list[dict], out: Path) -> bool:
    """Write the training/validation loss curve (and, for preference runs, the reward margin
    and accuracy below it); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = _curve(metrics, "train", "loss")
    valid = _curve(metrics, "eval", "val_loss")
    preference = any("reward_margin" in m for m in metrics)
    if preference:
        fig, (ax, lower) = plt.subplots(2, 1, figsize=(7, 7), dpi=100, sharex=True)
        _plot_rewards(lower, metrics)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or valid:  # an empty legend only warns
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
        TextColumn("{task.fields[prefs]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("{task.fields[mem]}"),
        TimeRemainingColumn(),
        console=console,
    )


def _preference_text(metrics: dict[str, float]) -> str:
    """Reward margin and preference accuracy, for the progress line (empty for SFT)."""
    if "reward_margin" not in metrics:
        return ""
    return f"margin {metrics['reward_margin']:+.3f} acc {metrics['accuracy']:.0%}"


class RunReporter:
    """What rank 0 shows and writes while the loop runs: the progress bar, metrics.jsonl,
    loss warnings, checkpoints and loss.png. Other ranks get a :class:`SilentReporter`."""

    def __init__(self, run: RunDir, console: Console, windows: int, watch: LossWatch):
        self.run, self.windows, self.watch = run, windows, watch
        self.progress = progress_bar(console)
        self.metrics: MetricsLog | None = None
        self.saved_step = -1  # the step of the newest checkpoint this run has

    def start(self, state: LoopState, stop_at: int, resume: bool) -> None:
        self.metrics = MetricsLog(self.run.metrics, state.step if resume else None)
        self.saved_step = state.step if resume else -1
        self.task = self.progress.add_task(
            "train",
            total=stop_at,
            completed=state.step,
            epoch=state.epoch + 1,
            loss="-",
            prefs="",
            lr="-",
            tps="-",
            mem="-",
        )

    def __enter__(self) -> RunReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.progress.__exit__(*exc)
        return False

    def _epoch(self, state: LoopState) -> float:
        return round(state.epoch + state.window / self.windows, 4)

    def step(self, state: LoopState, result: Any, tokens_per_s: float, memory_gb: float) -> None:
        """Log one optimizer step: metrics.jsonl, the progress bar and any loss warning."""
        extra = {k: v for k, v in result.metrics.items() if k != "loss"}
        self.metrics.write(
            type="train",
            step=state.step,
            epoch=self._epoch(state),
            loss=result.loss,
            **extra,
            lr=result.lr,
            grad_norm=result.grad_norm,
            tokens=state.tokens,
            tokens_per_s=round(tokens_per_s, 1),
            peak_memory_gb=round(memory_gb, 3),
            elapsed_s=round(state.elapsed_s, 2),
        )
        for warning in self.watch.update(state.step, result.loss):
            self.progress.console.print(f"[yellow]⚠[/] {warning}")
        # The bar shows the smoothed loss (EMA); metrics.jsonl keeps every raw value.
        self.progress.update(
            self.task,
            completed=state.step,
            epoch=state.epoch + 1,
            loss=f"{self.watch.ema:.4f}",
            prefs=_preference_text(result.metrics),
            lr=f"{result.lr:.2e}",
            tps=f"{tokens_per_s:,.0f}",
            mem=f"{memory_gb:.1f}G",
        )

    def validation(self, state: LoopState, metrics: dict[str, float]) -> None:
        loss = metrics["loss"]
        extra = {f"val_{k}": v for k, v in metrics.items() if k != "loss"}
        if not extra:  # perplexity means something for a token loss only
            extra = {"val_ppl": math.exp(min(loss, 50))}
        self.metrics.write(
            type="eval", step=state.step, epoch=self._epoch(state), val_loss=loss, **extra
        )
        more = _preference_text(metrics)
        self.progress.console.print(
            f"step {state.step}: validation loss {loss:.4f}" + (f", {more}" if more else "")
        )

    def checkpoint(self, state: LoopState, write_backend_state) -> None:
        """Save a checkpoint of ``state`` unless this step already has one."""
        if self.saved_step != state.step:
            checkpoints.save(self.run.path, state, write_backend_state)
            self.saved_step = state.step

    def finish(self) -> None:
        """loss.png is a by-product: failing to write it must not hide how training ended."""
        try:
            plot_loss(self.metrics.read(), self.run.loss_plot)
        except UserError as err:
            self.progress.console.print(f"[yellow]⚠[/] loss.png not written: {err}")


class SilentReporter(RunReporter):
    """A rank other than 0: shows nothing, writes nothing (rank 0 does both)."""

    def start(self, state: LoopState, stop_at: int, resume: bool) -> None:
        pass

    def __enter__(self) -> SilentReporter:
        return self

    def step(self, state: LoopState, result: Any, tokens_per_s: float, memory_gb: float) -> None:
        pass

    def validation(self, state: LoopState, metrics: dict[str, float]) -> None:
        pass

    def checkpoint(self, state: LoopState, write_backend_state) -> None:
        pass

    def finish(self) -> None:
        pass
