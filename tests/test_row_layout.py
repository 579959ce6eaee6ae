"""``training.packing``: the layout ``auto`` picks on each backend, and length-bucketed batches
(mlx-lm's order with our target-only loss): the same loss as packed rows, every row once an
epoch in whole batches, split across ranks, deterministic and resumable bit for bit."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from repo_helpers import BUNDLED_TRAIN
from rich.console import Console
from train_helpers import losses, run_config, start_run

from qwen_mlx.config import row_layout
from qwen_mlx.config_file import load_config
from qwen_mlx.data import normalize
from qwen_mlx.errors import TrainingStopped
from qwen_mlx.loop import train_loop
from qwen_mlx.run_data import build_run_data, sample_run_data
from qwen_mlx.tokens import Sample, bucket, collate, load_tokenizer, pack, unpacked
from qwen_mlx.tokens import encode_records as encode

QUIET = Console(quiet=True)


def samples_of(lengths) -> list[Sample]:
    """One sample per length; its tokens say which sample it is (ids 10 + k)."""
    return [Sample([10 + k] * n, [0] + [1] * (n - 1)) for k, n in enumerate(lengths)]


LENGTHS = [37, 5, 120, 64, 9, 64, 200, 18, 91, 33, 150, 7, 70]


def test_auto_is_the_default_and_picks_the_layout_measured_fastest_on_each_backend():
    training = load_config().training
    assert training.packing == "auto"
    # bench/train_mlx.py, bench/train_torch.py (BENCHMARKS.md): MLX and torch on a CPU run
    # one-sample rows in length-sorted batches faster than packed rows; a GPU keeps packing.
    assert row_layout(training, "mlx") == "bucketed"
    assert row_layout(training, "torch/cpu") == "bucketed"
    assert row_layout(training, "torch/cuda") == row_layout(training, "torch") == "packed"
    for value, layout in (("true", "packed"), ("false", "unpacked"), ("bucketed", "bucketed")):
        explicit = load_config(None, None, [f"training.packing={value}"]).training
        assert {row_layout(explicit, w) for w in ("mlx", "torch/cpu", "torch")} == {layout}


def test_a_run_knows_where_it_trains(tiny_model_dir):
    pytest.importorskip("torch")
    from qwen_mlx.backends.torch_trainer import TorchBackend
    from qwen_mlx.run_data import layout_place

    cfg = load_config(None, None, [f"model.path={tiny_model_dir}", "model.quantization=none"])
    plan = TorchBackend().plan(cfg)
    assert layout_place("torch", plan) == f"torch/{plan.settings.device.type}"
    if plan.settings.device.type == "cpu":
        assert row_layout(cfg.training, layout_place("torch", plan)) == "bucketed"
    if importlib.util.find_spec("mlx_lm"):
        from qwen_mlx.backends.mlx_trainer import MLXBackend

        assert layout_place("mlx", MLXBackend().plan(cfg)) == "mlx"


def test_a_run_lays_its_data_out_for_where_it_trains(tiny_model_dir, small_data, tmp_path):
    cfg = run_config(tiny_model_dir, small_data, tmp_path)
    tokenizer = load_tokenizer(tiny_model_dir)
    on_mlx = build_run_data(cfg, tokenizer, where="mlx")
    on_torch = build_run_data(cfg, tokenizer, where="torch/cuda")
    assert on_mlx.train_batches is not None and all(r.num_segments == 1 for r in on_mlx.train)
    assert on_torch.train_batches is None and max(r.num_segments for r in on_torch.train) > 1
    assert "length-bucketed batches" in on_mlx.messages[-1]
    assert on_mlx.fingerprint != on_torch.fingerprint
    tokens = [sum(r.num_tokens for r in data.train) for data in (on_mlx, on_torch)]
    assert tokens[0] == tokens[1]  # the same samples, laid out differently


def test_bad_packing_values_name_the_key_and_the_choices():
    from qwen_mlx.errors import UserError

    for value in ("maybe", "null"):
        with pytest.raises(UserError, match=r"training\.packing.*true or false"):
            load_config(None, None, [f"training.packing={value}"])


def test_bucketed_batches_are_length_sorted_neighbours_covering_every_row_once():
    rows = unpacked(samples_of(LENGTHS), 0)
    batches = bucket(rows, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(rows)))
    lengths = [len(rows[i].input_ids) for i in flat]
    assert lengths == sorted(lengths)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 1]
    assert flat.index(3) < flat.index(5)  # equal lengths keep their order: deterministic
    assert bucket(rows, 3) == batches


def padding(batches) -> int:
    return sum(collate(b, 0)["input_ids"].size - sum(r.num_tokens for r in b) for b in batches)


def test_bucketing_pads_far_less_than_random_batches_of_the_same_size():
    rows = unpacked(samples_of(LENGTHS * 4), 0)
    order = np.random.default_rng(0).permutation(len(rows))
    random_batches = [[rows[i] for i in order[at : at + 4]] for at in range(0, len(rows), 4)]
    bucketed = [[rows[i] for i in b] for b in bucket(rows, 4)]
    assert padding(bucketed) < padding(random_batches) / 5


def _mlx_loss():
    pytest.importorskip("mlx_lm")
    from qwen_mlx.backends import mlx_model

    return lambda model, batch: float(mlx_model.target_loss(model, *mlx_model.device_batch(batch)))


def _torch_loss():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from qwen_mlx.backends import torch_model

    def loss(model, batch):
        keys = ("input_ids", "position_ids", "loss_mask")
        tensors = (torch.from_numpy(batch[k]).long() for k in keys)
        with torch.no_grad():
            return float(torch_model.TokenLoss(model)(*tensors))

    return loss


def _torch_model(model_dir):
    import torch

    from qwen_mlx.backends import torch_model

    cfg = load_config(None, None, [f"model.path={model_dir}", "lora.dropout=0"])
    model = torch_model.add_lora(torch_model.load_base(model_dir, "none", torch.device("cpu")), cfg)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # make the adapter matter
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model.eval()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_bucketed_batches_give_the_same_loss_per_sample_as_packed_rows(backend, family_model_dir):
    from backend_helpers import mlx_lora_model

    loss = _mlx_loss() if backend == "mlx" else _torch_loss()
    model = (mlx_lora_model if backend == "mlx" else _torch_model)(family_model_dir)
    tokenizer = load_tokenizer(family_model_dir)
    records = [json.loads(x) for x in BUNDLED_TRAIN.read_text(encoding="utf-8").splitlines()[:6]]
    samples, _ = encode(tokenizer, [normalize(r)[0] for r in records], 1024)
    rows = unpacked(samples, 0)
    (packed,) = pack(samples, sum(len(s) for s in samples), pad_id=0)
    batches = bucket(rows, 4)
    assert [len(b) for b in batches] == [4, 2]  # padded batches of several samples
    by_batch = sum(loss(model, collate([rows[i] for i in b], 0)) for b in batches)
    alone = [loss(model, collate([r], 0)) for r in rows]
    assert by_batch == pytest.approx(loss(model, collate([packed], 0)), rel=1e-5)
    assert by_batch == pytest.approx(sum(alone), rel=1e-5)
    # per sample too: a batch's loss is the sum of its samples' own losses
    first = batches[0]
    assert loss(model, collate([rows[i] for i in first], 0)) == pytest.approx(
        sum(alone[i] for i in first), rel=1e-5
    )


# ---------------------------------------------------------------- the loop with a fake backend


class Recorder:
    """A backend that records which samples each micro-step and validation batch held."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.steps: list[list[int]] = []
        self.scales: list[float] = []
        self.evaluated: list[list[int]] = []

    @staticmethod
    def samples(batch) -> list[int]:
        return sorted(int(ids[0]) - 10 for ids in batch["input_ids"])

    def micro_step(self, batch, scales, sync):
        self.steps.append(self.samples(batch))
        self.scales.append(scales["tokens"])
        return {"loss": 2.0 * int(batch["loss_mask"][:, 1:].sum())}

    def optimizer_step(self, lr):
        return 1.0

    def eval_sums(self, batches):
        batches = list(batches)
        self.evaluated += [self.samples(b) for b in batches]
        return {"loss": sum(float(b["loss_mask"][:, 1:].sum()) for b in batches)}

    def save_state(self, folder):
        (folder / "adapter").mkdir()

    def all_reduce_sum(self, value):
        return value

    def peak_memory_gb(self):
        return 0.0

    def discard_gradients(self): ...
    def snapshot_rng(self): ...
    def load_state(self, folder): ...
    def save_adapter(self, folder): ...
    def close(self): ...


def bucketed_cfg(*sets):
    base = [
        "training.packing=bucketed",
        "training.batch_size=3",
        "training.gradient_accumulation_steps=2",
        "training.warmup_steps=1",
        "training.num_epochs=2",
    ]
    return load_config(None, None, [*base, *sets])


def bucketed_data(cfg, lengths=LENGTHS):
    samples = samples_of(lengths)
    return sample_run_data(samples, samples_of([12, 40, 8, 30]), cfg, 0, "bucketed")


def test_the_loop_trains_whole_bucketed_batches_every_row_once_an_epoch(tmp_path):
    cfg = bucketed_cfg()
    data = bucketed_data(cfg)
    hooks = Recorder()
    train_loop(cfg, data, hooks, tmp_path, QUIET, resume=False)
    groups = sorted(sorted(b) for b in data.train_batches)
    per_epoch = len(groups)
    epochs = [hooks.steps[:per_epoch], hooks.steps[per_epoch:]]
    assert len(hooks.steps) == 2 * per_epoch
    for epoch in epochs:
        assert sorted(epoch) == groups  # each micro-step is one whole bucketed batch
    assert epochs[0] != epochs[1]  # batches shuffled anew each epoch
    # validation in its own bucketed batches (lengths 8, 12, 30 | 40)
    assert hooks.evaluated and hooks.evaluated[:2] == [[0, 2, 3], [1]]
    # token-weighted accumulation: a window's scale is 1 / its target tokens
    lengths = {k: n for k, n in enumerate(LENGTHS)}
    first = epochs[0][:2]
    assert hooks.scales[0] == pytest.approx(1 / sum(lengths[k] - 1 for b in first for k in b))


def test_ranks_share_out_whole_bucketed_batches(tmp_path):
    cfg = bucketed_cfg("training.num_epochs=1")
    data = bucketed_data(cfg)
    ranks = [Recorder(rank, 2) for rank in range(2)]
    for hooks in ranks:  # rank 0 writes the run folder, the other rank nothing
        train_loop(cfg, data, hooks, tmp_path, QUIET, resume=False)
    seen = [{tuple(b) for b in hooks.steps} for hooks in ranks]
    assert len(ranks[0].steps) == len(ranks[1].steps) == len(data.train_batches) // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {tuple(sorted(b)) for b in data.train_batches}


def test_resume_on_other_batches_is_refused(tmp_path):
    cfg = bucketed_cfg("training.max_steps=1")
    train_loop(cfg, bucketed_data(cfg), Recorder(), tmp_path, QUIET, resume=False)
    other = bucketed_cfg("training.batch_size=2")
    with pytest.raises(TrainingStopped, match=r"layout \(training\.packing, batch_size\)"):
        train_loop(other, bucketed_data(other), Recorder(), tmp_path, QUIET, resume=True)


def test_a_bucketed_batch_stays_within_the_memory_estimates_rows():
    # memory.estimate_run counts batch_size rows of max_seq_length tokens
    cfg = bucketed_cfg("training.max_seq_length=256")
    data = bucketed_data(cfg, [256, 256, 255, 3, 256, 100])
    for batch in data.train_batches:
        shape = collate([data.train[i] for i in batch], 0)["input_ids"].shape
        assert shape[0] <= cfg.training.batch_size and shape[1] <= 256


# ---------------------------------------------------------------- real runs


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_resume_with_bucketing_is_bit_identical(backend, tiny_model_dir, small_data, tmp_path):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "peft")
    from safetensors.numpy import load_file

    common = (
        "training.packing=bucketed",
        "training.num_epochs=4",
        "training.batch_size=3",
        "training.gradient_accumulation_steps=2",
        "lora.dropout=0.1",
    )
    straight = run_config(tiny_model_dir, small_data, tmp_path / "a", *common)
    straight.training.max_steps = 5
    start_run(straight, backend)
    first = run_config(tiny_model_dir, small_data, tmp_path / "b", *common)
    first.training.max_steps = 2
    start_run(first, backend)
    first.training.max_steps = 5
    start_run(first, backend, resume=True)
    a, b = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in "ab")
    assert a and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 5


def test_bucketed_preference_batches_hold_whole_pairs(tiny_model_dir, tmp_path):
    rows = [json.loads(x) for x in BUNDLED_TRAIN.read_text(encoding="utf-8").splitlines()[:10]]
    pairs = [
        {"instruction": r["instruction"], "chosen": r["output"], "rejected": rows[-1 - k]["output"]}
        for k, r in enumerate(rows[:9])
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs), encoding="utf-8")
    cfg = run_config(tiny_model_dir, path, tmp_path / "run", "training.objective=dpo")
    data = build_run_data(cfg, load_tokenizer(tiny_model_dir), where="mlx")  # auto: bucketed
    assert data.train_batches is not None
    assert all(r.num_segments == 2 for r in data.train)  # chosen and rejected share a row
    assert all(len(b) <= cfg.training.batch_size for b in data.train_batches)
    assert sorted(i for b in data.train_batches for i in b) == list(range(len(data.train)))


def test_a_run_records_the_layout_auto_picked_and_resumes_with_it(
    tiny_model_dir, small_data, tmp_path
):
    pytest.importorskip("peft")
    from qwen_mlx import training_run
    from qwen_mlx.config_file import config_to_yaml

    started = run_config(tiny_model_dir, small_data, tmp_path / "run", "training.max_steps=1")
    assert started.training.packing == "auto"
    started.training.backend = "torch"
    original = tmp_path / "config.yaml"
    original.write_text(config_to_yaml(started), encoding="utf-8")
    run_dir = training_run.start(original, None, None, (), None, QUIET)
    saved = load_config(run_dir / "config.yaml")
    assert saved.training.packing == "bucketed"  # what auto picks for torch on this CPU
    # resuming with the file the run started from (auto) keeps the recorded layout
    resumed, _ = training_run.resolve_run(original, None, None, (), run_dir)
    assert resumed.training.packing == "bucketed"


def test_a_batch_of_one_sample_rows_keeps_transformers_plain_causal_mask():
    torch = pytest.importorskip("torch")
    masking = pytest.importorskip("transformers.masking_utils")
    rows = unpacked(samples_of([5, 9, 3]), 0)
    batch = collate([rows[i] for i in bucket(rows, 3)[0]], 0)
    positions = torch.from_numpy(batch["position_ids"]).long()
    # padding goes on counting, so nothing reads as a second, packed sequence
    assert masking.find_packed_sequence_indices(positions) is None
    (row,) = pack(samples_of([5, 9, 3]), 20, pad_id=0)
    packed = torch.from_numpy(collate([row], 0)["position_ids"]).long()
    assert masking.find_packed_sequence_indices(packed) is not None
