"""The training loop shared by every backend.

A backend's ``trainer`` supplies :class:`Hooks` (forward/backward on one batch, optimizer
update, eval, checkpoint files); this module owns everything else, so MLX and PyTorch runs
behave the same: data order, gradient accumulation, warmup + cosine schedule, validation,
checkpoints, resume and Ctrl-C. What the user sees and the run folder gets (progress, metrics,
loss warnings, checkpoints, loss.png) goes through one reporter, a
:class:`~qwen_mlx.monitor.RunReporter` on rank 0 and a silent one elsewhere.
:func:`qwen_mlx.training_run.train` calls :func:`train_loop`.

What is minimised is the objective's (:mod:`qwen_mlx.objectives`: SFT, DPO, ORPO): it
gives the denominators of a window (target tokens, pairs), the hooks compute its loss, and
it turns the summed values into the logged metrics. DPO's reference log-probs are computed
once, before the first update (and before a checkpoint is restored), from the weights the
run starts with: the base (a new adapter's B is 0) or the ``training.from_adapter`` one.

Determinism is what makes resume exact: the row order of epoch ``e`` is a permutation
seeded by ``(seed, e)`` (of rows, or of the fixed length-bucketed batches of
``training.packing: bucketed``, see :mod:`qwen_mlx.run_data`), the learning rate is a
function of the step, checkpoints are taken at optimizer-update boundaries, and the backend
saves the RNG state (dropout) as of the start of the next accumulation window.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.console import Console

from qwen_mlx import checkpoints, objectives
from qwen_mlx.checkpoints import LoopState
from qwen_mlx.config import Config
from qwen_mlx.errors import TrainingStopped, UserError
from qwen_mlx.monitor import LossWatch, RunReporter, SilentReporter
from qwen_mlx.run_data import RunData
from qwen_mlx.run_dir import RunDir
from qwen_mlx.tokens import Row, collate


class Hooks(Protocol):
    """What a backend does for the loop; batches are dicts of numpy arrays (see collate)."""

    rank: int
    world_size: int

    def micro_step(
        self, batch: dict[str, np.ndarray], scales: dict[str, float], sync: bool
    ) -> dict[str, float]:
        """Forward + backward of the objective's loss of ``batch``, each of its sums divided
        by the window's count (``scales``: key → 1/count); return the objective's sums."""

    def optimizer_step(self, lr: float) -> float:
        """Clip, update, zero the gradients; return the gradient norm before clipping."""

    def discard_gradients(self) -> None: ...

    def eval_sums(self, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, float]:
        """The objective's sums over ``batches`` (no dropout, no gradient)."""

    def reference_logps(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Each sample's summed target log-prob under the weights the run started with (no
        dropout, no gradient); called before any update or restored checkpoint."""

    def snapshot_rng(self) -> None:
        """Remember the RNG state now; checkpoints save the last snapshot."""

    def save_state(self, folder: Path) -> None:
        """Write adapter, optimizer and RNG snapshot into ``folder``."""

    def load_state(self, folder: Path) -> None: ...

    def save_adapter(self, folder: Path) -> None:
        """Write the canonical PEFT-format adapter into ``folder``."""

    def all_reduce_sum(self, value: float) -> float: ...

    def peak_memory_gb(self) -> float: ...

    def close(self) -> None:
        """End what the trainer started (DDP); called once, however the run ended."""


@dataclass
class Schedule:
    """A run's schedule: how many rows, batches, windows and optimizer updates it has.
    With bucketed batches, ``rows`` counts whole batches and ``batch_size`` is 1."""

    rows: int
    batch_size: int
    accumulation: int
    epochs: int
    warmup: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @property
    def windows_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulation)

    @property
    def total_steps(self) -> int:
        return self.windows_per_epoch * self.epochs


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` updates, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def rank_rows(rows: list, rank: int, world: int) -> list:
    """This rank's share of rows (or of bucketed batches); every rank gets the same count so
    collectives stay in step."""
    share = len(rows) // world if world > 1 else len(rows)
    return rows[rank::world][:share]


def _units(rows: list[Row], batches: list[list[int]] | None) -> list[list[Row]]:
    """What an epoch's order permutes: single rows, or the fixed bucketed batches whole."""
    if batches is None:
        return [[row] for row in rows]
    return [[rows[i] for i in batch] for batch in batches]


def _windows(order: list[int], schedule: Schedule) -> list[list[list[int]]]:
    batches = [
        order[i : i + schedule.batch_size] for i in range(0, len(order), schedule.batch_size)
    ]
    return [
        batches[i : i + schedule.accumulation]
        for i in range(0, len(batches), schedule.accumulation)
    ]


def _every(value: int, total: int, times: int) -> int:
    return value if value > 0 else max(1, total // times)


def _batches(
    rows: list[Row], batch_size: int, pad_id: int, groups: list[list[int]] | None = None
) -> list[dict[str, np.ndarray]]:
    """``rows`` collated ``batch_size`` at a time in order, or as the bucketed ``groups``."""
    if groups is not None:
        return [collate([rows[i] for i in group], pad_id) for group in groups]
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def _evaluate(
    hooks: Hooks,
    objective,
    rows: list[Row],
    batch_size: int,
    pad_id: int,
    groups: list[list[int]] | None = None,
) -> dict[str, float] | None:
    if not rows:
        return None
    batches = _batches(rows, batch_size, pad_id, groups)
    counts = objectives.window_counts(objective, batches)
    return objective.summarize(hooks.eval_sums(iter(batches)), counts)


def attach_reference(hooks: Hooks, rows: list[Row], batch_size: int, pad_id: int) -> None:
    """Set every row's ``ref_logps``: its samples' log-probs under the starting weights, in
    batches of ``batch_size`` rows in row order, so a resumed run gets the same numbers."""
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        logps = np.asarray(hooks.reference_logps(collate(part, pad_id)), dtype=np.float32)
        at = 0
        for row in part:
            row.ref_logps = logps[at : at + row.num_segments]
            at += row.num_segments


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, loss included


class _NotFinite(Exception):
    """The loss of an update was NaN or inf (the update was not applied)."""


def _train_window(
    hooks: Hooks, objective, window: list[dict[str, np.ndarray]], lr: float
) -> StepResult:
    """One optimizer update over an accumulation window; the loss is the objective's mean
    over the whole window (per target token for SFT, per pair for DPO), however it is split
    into batches and ranks."""
    local = objectives.window_counts(objective, window)
    counts = {key: hooks.all_reduce_sum(float(n)) for key, n in local.items()}
    # DDP averages gradients over ranks, hence world_size / (count of all ranks).
    scales = {key: hooks.world_size / max(n, 1.0) for key, n in counts.items()}
    sums: dict[str, float] = {}
    for k, batch in enumerate(window):
        objectives.add_sums(sums, hooks.micro_step(batch, scales, sync=k == len(window) - 1))
    sums = {key: hooks.all_reduce_sum(value) for key, value in sums.items()}
    metrics = objective.summarize(sums, counts)
    loss = metrics["loss"]
    if not math.isfinite(loss):
        hooks.discard_gradients()
        raise _NotFinite(loss)
    grad_norm = hooks.optimizer_step(lr)
    hooks.snapshot_rng()
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in window) * hooks.world_size
    return StepResult(loss, lr, grad_norm, tokens, metrics)


def _last_checkpoint(run_dir: Path, last_saved: int, resumable: bool = True) -> str:
    """The checkpoint written last (if any), for the message of a stopped run."""
    if last_saved < 0:
        return "no checkpoint was written yet"
    folder = checkpoints.checkpoint_dir(run_dir, last_saved)
    then = f"; `qwen-mlx train --resume {run_dir}` continues from it" if resumable else ""
    return f"the last checkpoint is {folder}{then}"


def _schedule(cfg: Config, units: int, per_batch: int, console: Console, main: bool) -> Schedule:
    t = cfg.training
    schedule = Schedule(
        units, per_batch, t.gradient_accumulation_steps, t.num_epochs, t.warmup_steps
    )
    if t.warmup_steps >= schedule.total_steps:
        schedule.warmup = schedule.total_steps // 10
        if main:
            console.print(
                f"[yellow]⚠[/] warmup_steps {t.warmup_steps} ≥ the run's {schedule.total_steps} "
                f"updates; warming up over {schedule.warmup} instead"
            )
    return schedule


def _resume(run_dir: Path, hooks: Hooks, data: RunData, console: Console) -> LoopState:
    main = hooks.rank == 0

    def note(line: str) -> None:
        console.print(f"[yellow]⚠[/] {line}", highlight=False, soft_wrap=True)

    folder, state = checkpoints.restore(run_dir, hooks.load_state, note, main)
    if state.data_fingerprint != data.fingerprint:
        raise TrainingStopped(
            f"the training data, tokenizer or row layout (training.packing, batch_size) "
            f"changed since {folder}; resuming needs the same (or start a new run)"
        )
    if main:
        console.print(f"resuming from {folder} (step {state.step})", soft_wrap=True)
    return state


def _reporter(hooks: Hooks, run: RunDir, console: Console, schedule: Schedule) -> RunReporter:
    watch = LossWatch(schedule.total_steps, schedule.warmup)
    reporter = RunReporter if hooks.rank == 0 else SilentReporter
    return reporter(run, console, schedule.windows_per_epoch, watch)


@dataclass
class _Run:
    """One call of the loop: what it trains on and how often it validates and saves."""

    cfg: Config
    data: RunData
    hooks: Hooks
    objective: objectives.SFT
    units: list[list[Row]]  # what an epoch permutes: rows, or whole bucketed batches
    schedule: Schedule
    stop_at: int
    reporter: RunReporter
    eval_every: int
    save_every: int

    def validate(self, state: LoopState) -> None:
        if self.hooks.rank != 0:  # validation is rank 0's alone (no collectives in it)
            return
        t, data = self.cfg.training, self.data
        metrics = _evaluate(
            self.hooks, self.objective, data.valid, t.batch_size, data.pad_id, data.valid_batches
        )
        if metrics is not None:
            self.reporter.validation(state, metrics)

    def checkpoint(self, state: LoopState) -> None:
        self.reporter.checkpoint(state, self.hooks.save_state)


def _epochs(run: _Run, state: LoopState, ctrl_c: _CtrlC) -> None:
    """Train window by window until ``run.stop_at``, validating and saving on schedule."""
    t, schedule, hooks = run.cfg.training, run.schedule, run.hooks
    session_start, session_tokens = time.perf_counter(), 0
    elapsed_before = state.elapsed_s
    while state.step < run.stop_at:
        if not state.order:
            state.order = epoch_order(t.seed, state.epoch, len(run.units))
        windows = _windows(state.order, schedule)
        while state.window < len(windows) and state.step < run.stop_at:
            batch_rows = [[row for i in b for row in run.units[i]] for b in windows[state.window]]
            window = [collate(b, run.data.pad_id) for b in batch_rows]
            lr = learning_rate(state.step, schedule.total_steps, schedule.warmup, t.learning_rate)
            result = _train_window(hooks, run.objective, window, lr)
            state.step, state.window = state.step + 1, state.window + 1
            state.tokens += result.tokens
            session_tokens += result.tokens
            seconds = time.perf_counter() - session_start
            state.elapsed_s = elapsed_before + seconds
            tokens_per_s = session_tokens / max(seconds, 1e-9)
            run.reporter.step(state, result, tokens_per_s, hooks.peak_memory_gb())
            if state.step % run.eval_every == 0:
                run.validate(state)
            if state.step % run.save_every == 0:
                run.checkpoint(state)
            # Every rank stops after the same step, even if only one saw Ctrl-C.
            if hooks.all_reduce_sum(float(ctrl_c.requested)) > 0:
                raise KeyboardInterrupt
        if state.window >= len(windows):  # epoch done
            state.epoch, state.window, state.order = state.epoch + 1, 0, []
            if state.step % run.eval_every != 0:
                run.validate(state)
            run.checkpoint(state)


def train_loop(
    cfg: Config, data: RunData, hooks: Hooks, run_dir: Path, console: Console, resume: bool
) -> LoopState:
    """Train until the schedule (or ``training.max_steps``) is done; return the final state."""
    t = cfg.training
    units = rank_rows(_units(data.train, data.train_batches), hooks.rank, hooks.world_size)
    per_batch = t.batch_size if data.train_batches is None else 1
    schedule = _schedule(cfg, len(units), per_batch, console, hooks.rank == 0)
    total = schedule.total_steps
    objective = objectives.build(t)
    if objective.reference:
        rows = [row for unit in units for row in unit]
        _reference(hooks, rows + data.valid, t.batch_size, data.pad_id, console)
    state = _resume(run_dir, hooks, data, console) if resume else LoopState()
    state.data_fingerprint = data.fingerprint
    stop_at = min(total, t.max_steps) if t.max_steps else total
    reporter = _reporter(hooks, RunDir(run_dir), console, schedule)
    reporter.start(state, stop_at, resume)
    every = _every(t.eval_every, total, 10), _every(t.save_every, total, 5)
    run = _Run(cfg, data, hooks, objective, units, schedule, stop_at, reporter, *every)
    hooks.snapshot_rng()
    ctrl_c = _CtrlC()
    try:
        with ctrl_c, reporter:
            _epochs(run, state, ctrl_c)
        run.checkpoint(state)
    except TrainingStopped:
        raise
    except UserError as err:  # a write failed (full disk): what was saved before is intact
        raise TrainingStopped(f"{err}; {_last_checkpoint(run_dir, reporter.saved_step)}") from None
    except _NotFinite as err:
        raise TrainingStopped(
            f"loss became {err.args[0]} at step {state.step + 1}; stopped. Lower "
            f"training.learning_rate (e.g. 2-5×) and start a new run "
            f"({_last_checkpoint(run_dir, reporter.saved_step, resumable=False)})"
        ) from None
    except KeyboardInterrupt:
        _interrupted(run, state, ctrl_c, run_dir)
    finally:
        reporter.finish()
    return state


def _reference(hooks: Hooks, rows: list[Row], batch_size: int, pad_id: int, console) -> None:
    started = time.perf_counter()
    attach_reference(hooks, rows, batch_size, pad_id)
    if hooks.rank == 0:
        pairs = sum(r.num_segments for r in rows) // 2
        seconds = time.perf_counter() - started
        console.print(f"reference log-probs of {pairs} pairs: {seconds:.1f} s", highlight=False)


def _interrupted(run: _Run, state: LoopState, ctrl_c: _CtrlC, run_dir: Path) -> None:
    """Ctrl-C: once, save a checkpoint of the finished step; twice, save nothing."""
    run.hooks.discard_gradients()
    if ctrl_c.forced:  # mid-step: the model may be ahead of `state`, so save nothing
        raise TrainingStopped(
            f"stopped at once during step {state.step + 1}; "
            f"{_last_checkpoint(run_dir, run.reporter.saved_step)}",
            exit_code=130,
        ) from None
    run.checkpoint(state)
    raise TrainingStopped(
        f"interrupted at step {state.step}/{run.schedule.total_steps}; checkpoint saved. Resume "
        f"with: qwen-mlx train --resume {run_dir}",
        exit_code=130,
    ) from None


class _CtrlC:
    """The first Ctrl-C asks the loop to stop after the current optimizer step, so the
    checkpoint it then writes is consistent; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = self.forced = False
        self.previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nstopping after this step (Ctrl-C again to stop at once)\n")

    def __enter__(self):
        # Where SIGINT is ignored (a background job of a script, `nohup … &` from one), the
        # user asked for Ctrl-C to pass the run by: leave it so, as Python itself does.
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
