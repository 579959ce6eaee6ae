"""The shared training loop with a fake backend: schedule, accumulation, NaN stop, warnings."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal

import numpy as np
import pytest
from rich.console import Console

from qwen_mlx.config_file import load_config
from qwen_mlx.errors import TrainingStopped
from qwen_mlx.loop import Schedule, epoch_order, learning_rate, rank_rows, train_loop
from qwen_mlx.monitor import LossWatch
from qwen_mlx.run_data import RunData, fingerprint
from qwen_mlx.tokens import Sample, pack

QUIET = Console(quiet=True)


class FakeHooks:
    """Records what the loop asks for; the 'loss' is a number we choose."""

    rank, world_size = 0, 1

    def __init__(self, losses=None):
        self.losses = list(losses or [])
        self.calls: list[tuple] = []
        self.lrs: list[float] = []
        self.saved: list[str] = []

    def micro_step(self, batch, scales, sync):
        targets = int(batch["loss_mask"][:, 1:].sum())
        per_token = self.losses.pop(0) if self.losses else 2.0
        self.calls.append(("micro", targets, scales["tokens"], sync))
        return {"loss": per_token * targets}

    def optimizer_step(self, lr):
        self.lrs.append(lr)
        return 1.0

    def discard_gradients(self):
        self.calls.append(("discard",))

    def eval_sums(self, batches):
        return {"loss": 1.5 * sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)}

    def snapshot_rng(self):
        pass

    def save_state(self, folder):
        (folder / "adapter").mkdir()
        self.saved.append(folder)

    def load_state(self, folder):
        pass

    def save_adapter(self, folder):
        pass

    def all_reduce_sum(self, value):
        return value

    def peak_memory_gb(self):
        return 0.0

    def close(self):
        self.calls.append(("close",))


def run_data(n_rows=10):
    samples = [Sample([1] * 8, [0] + [1] * 7) for _ in range(n_rows)]
    rows = pack(samples, 8, 0)
    return RunData(train=rows, valid=rows[:2], pad_id=0, fingerprint=fingerprint(rows), messages=[])


def cfg(*sets):
    base = ["training.warmup_steps=2", "training.learning_rate=1e-3", "training.num_epochs=1"]
    return load_config(None, None, [*base, *sets])


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [learning_rate(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] < 0.001


def test_plan_counts_updates_like_the_seed():
    # 863 samples, batch 1, accumulation 4, 3 epochs: 216 updates an epoch.
    plan = Schedule(rows=863, batch_size=1, accumulation=4, epochs=3, warmup=30)
    assert plan.windows_per_epoch == 216 and plan.total_steps == 648


def test_epoch_order_is_seeded_and_differs_between_epochs():
    assert epoch_order(42, 0, 50) == epoch_order(42, 0, 50)
    assert epoch_order(42, 0, 50) != epoch_order(42, 1, 50)
    assert sorted(epoch_order(42, 1, 50)) == list(range(50))


def test_ranks_get_disjoint_equal_shares():
    rows = list(range(11))
    shares = [rank_rows(rows, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [5, 5] and not set(shares[0]) & set(shares[1])


def test_accumulation_scales_by_window_targets(tmp_path):
    hooks = FakeHooks()
    train_loop(
        cfg("training.batch_size=1", "training.gradient_accumulation_steps=3"),
        run_data(7),
        hooks,
        tmp_path,
        QUIET,
        resume=False,
    )
    micro = [c for c in hooks.calls if c[0] == "micro"]
    assert len(micro) == 7 and len(hooks.lrs) == 3  # windows of 3, 3 and 1 rows
    assert [c[3] for c in micro[:3]] == [False, False, True]  # DDP sync on the last only
    assert micro[0][2] == pytest.approx(1 / 21)  # 3 rows × 7 targets
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics if m["type"] == "train"] == pytest.approx([2.0] * 3)
    assert any(m["type"] == "eval" and m["val_loss"] == pytest.approx(1.5) for m in metrics)


def test_nan_loss_stops_without_an_update(tmp_path):
    hooks = FakeHooks(losses=[2.0, 2.0, math.nan])
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 3.*learning_rate"):
        train_loop(
            cfg("training.batch_size=1", "training.gradient_accumulation_steps=1"),
            run_data(6),
            hooks,
            tmp_path,
            QUIET,
            resume=False,
        )
    assert len(hooks.lrs) == 2 and ("discard",) in hooks.calls


def test_nan_stop_names_only_a_checkpoint_that_exists(tmp_path):
    settings = cfg(
        "training.batch_size=1", "training.gradient_accumulation_steps=1", "training.save_every=2"
    )
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with pytest.raises(TrainingStopped, match="no checkpoint was written yet") as early:
        train_loop(settings, run_data(6), FakeHooks([math.nan]), tmp_path / "a", QUIET, False)
    assert "checkpoints" not in str(early.value) and not (tmp_path / "a" / "checkpoints").exists()
    with pytest.raises(TrainingStopped) as late:
        train_loop(
            settings,
            run_data(6),
            FakeHooks([2.0] * 3 + [math.inf]),
            tmp_path / "b",
            QUIET,
            resume=False,
        )
    named = tmp_path / "b" / "checkpoints" / "step-000002"
    assert f"the last checkpoint is {named}" in str(late.value) and named.is_dir()


def test_max_steps_stops_early_and_checkpoints(tmp_path):
    hooks = FakeHooks()
    state = train_loop(
        cfg(
            "training.batch_size=1",
            "training.gradient_accumulation_steps=1",
            "training.max_steps=4",
            "training.num_epochs=3",
        ),
        run_data(6),
        hooks,
        tmp_path,
        QUIET,
        resume=False,
    )
    assert state.step == 4 and state.window == 4
    assert (tmp_path / "checkpoints" / "step-000004" / "adapter").is_dir()
    # The schedule still spans all 18 updates of the 3 epochs.
    assert hooks.lrs[-1] == pytest.approx(learning_rate(3, 18, 2, 1e-3))


def test_resume_refuses_changed_data(tmp_path):
    hooks = FakeHooks()
    settings = cfg("training.batch_size=1", "training.max_steps=2")
    train_loop(settings, run_data(6), hooks, tmp_path, QUIET, resume=False)
    with pytest.raises(TrainingStopped, match="changed"):
        train_loop(settings, run_data(9), hooks, tmp_path, QUIET, resume=True)


def test_loss_watch_gives_the_seeds_advice_once():
    flat = LossWatch(total_steps=60, warmup_steps=2)
    warnings = [w for s in range(1, 40) for w in flat.update(s, 3.0)]
    assert len(warnings) == 1 and "not falling" in warnings[0]
    spiky = LossWatch(total_steps=100, warmup_steps=2)
    warnings = [w for s, x in enumerate([3.0] * 10 + [12.0], 1) for w in spiky.update(s, x)]
    assert len(warnings) == 1 and "spiked" in warnings[0]
    noisy = LossWatch(total_steps=1000, warmup_steps=2)
    rng = np.random.default_rng(0)
    warnings = [w for s in range(1, 30) for w in noisy.update(s, float(rng.choice([0.5, 4.0])))]
    assert any("fluctuates" in w for w in warnings)
    falling = LossWatch(total_steps=60, warmup_steps=2)
    assert not [w for s in range(1, 60) for w in falling.update(s, 5.0 / s)]


class _Interrupting(FakeHooks):
    """Sends this process SIGINT (Ctrl-C) in the middle of the third update's window."""

    def micro_step(self, batch, scales, sync):
        if len(self.calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return super().micro_step(batch, scales, sync)


def test_ctrl_c_finishes_the_step_then_checkpoints(tmp_path, sigint_as_in_a_terminal):
    hooks = _Interrupting()
    settings = cfg("training.batch_size=1", "training.gradient_accumulation_steps=2")
    with pytest.raises(TrainingStopped, match="interrupted at step 3") as stopped:
        train_loop(settings, run_data(12), hooks, tmp_path, QUIET, resume=False)
    assert stopped.value.exit_code == 130
    assert len(hooks.lrs) == 3  # the step in progress was completed, not torn
    assert (tmp_path / "checkpoints" / "step-000003").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_an_ignored_sigint_stays_ignored(tmp_path, sigint_as_in_a_terminal):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `nohup qwen-mlx train &` in a script
    settings = cfg("training.batch_size=1", "training.gradient_accumulation_steps=2")
    hooks, undisturbed = _Interrupting(), FakeHooks()
    for run, run_hooks in (("a", hooks), ("b", undisturbed)):
        (tmp_path / run).mkdir()
        train_loop(settings, run_data(12), run_hooks, tmp_path / run, QUIET, resume=False)
    assert len(hooks.lrs) == len(undisturbed.lrs) > 3  # the SIGINT passed the run by
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_other_ranks_write_nothing_into_the_run_folder(tmp_path):
    hooks = FakeHooks()
    hooks.rank, hooks.world_size = 1, 2
    state = train_loop(cfg("training.save_every=1"), run_data(8), hooks, tmp_path, QUIET, False)
    assert state.step > 0 and hooks.saved == [] and list(tmp_path.iterdir()) == []


class _FakeBackend:
    """A backend whose trainer hands out the given hooks (for training_run.train)."""

    name = "fake"

    def __init__(self, hooks):
        self.hooks = hooks

    def plan(self, config):
        from qwen_mlx.backends.base import DevicePlan

        return DevicePlan("a fake device", "none", fp32=False, device_memory=None)

    def trainer(self, config, plan):
        return self.hooks


@pytest.mark.parametrize("loss", [2.0, float("nan")])
def test_the_trainer_is_closed_however_the_run_ends(
    loss, tiny_model_dir, small_data, tmp_path, monkeypatch
):
    from qwen_mlx import training_run

    hooks = FakeHooks([loss] * 100)
    monkeypatch.setattr(training_run, "get_backend", lambda name: _FakeBackend(hooks))
    config = cfg(f"model.path={tiny_model_dir}", f"data.train_file={small_data}")
    if math.isnan(loss):
        with pytest.raises(TrainingStopped, match="loss became nan"):
            training_run.train(config, tmp_path / "run", False, QUIET)
    else:
        result = training_run.train(config, tmp_path / "run", False, QUIET)
        assert result.steps > 0 and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert hooks.calls.count(("close",)) == 1
