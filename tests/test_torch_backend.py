"""The PyTorch backend on the tiny model (CPU): learning, packing, resume, adapter, 4-bit, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from qwen_mlx.backends.torch_model import (  # noqa: E402
    TokenLoss,
    add_lora,
    load_base,
    quantization_plan,
)
from qwen_mlx.config import load_config  # noqa: E402
from qwen_mlx.tokens import collate, load_tokenizer, pack, unpacked  # noqa: E402
from qwen_mlx.tokens import encode_records as encode  # noqa: E402
from tests.conftest import BUNDLED_TRAIN  # noqa: E402
from tests.train_helpers import (  # noqa: E402
    logged_steps,
    losses,
    run_config,
    start_run,
)


def train(cfg, resume=False):
    return start_run(cfg, "torch", resume)


def test_loss_falls_clearly_when_overfitting(tiny_model_dir, small_data, tmp_path):
    cfg = run_config(tiny_model_dir, small_data, tmp_path / "run", "training.num_epochs=12")
    result, _ = train(cfg)
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.6 * curve[0], curve
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    adapter = tmp_path / "run" / "adapter"
    assert result.adapter_dir == adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "run" / "data" / "valid.jsonl").read_text().count("\n") == 2


def lora_model(model_dir, seed=0):
    cfg = load_config(None, None, [f"model.path={model_dir}", "lora.dropout=0"])
    model = add_lora(load_base(model_dir, "none", torch.device("cpu")), cfg)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model.eval()


def test_packed_rows_equal_per_sample_logits_and_loss(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    records = [json.loads(x) for x in BUNDLED_TRAIN.read_text(encoding="utf-8").splitlines()[:5]]
    from qwen_mlx.data import normalize

    samples, _ = encode(tokenizer, [normalize(r)[0] for r in records], 1024)
    (row,) = pack(samples, sum(len(s) for s in samples) + 7, pad_id=0)  # one row, padded
    causal_lm = model.get_base_model()
    with torch.no_grad():
        ids = torch.from_numpy(row.input_ids).long()[None]
        pos = torch.from_numpy(row.position_ids).long()[None]
        packed = causal_lm(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        for seg in range(1, row.segment_ids.max() + 1):
            where = np.flatnonzero(row.segment_ids == seg)
            alone = causal_lm(input_ids=ids[:, where], use_cache=False).logits[0]
            torch.testing.assert_close(packed[where], alone, atol=1e-4, rtol=1e-4)
        loss = TokenLoss(model)
        batch = collate([row], 0)
        packed_loss = loss(
            *(torch.from_numpy(batch[k]).long() for k in ("input_ids", "position_ids", "loss_mask"))
        )
        single = 0.0
        for r in unpacked(samples, 0):
            b = collate([r], 0)
            single += float(
                loss(
                    *(
                        torch.from_numpy(b[k]).long()
                        for k in ("input_ids", "position_ids", "loss_mask")
                    )
                )
            )
    assert float(packed_loss) == pytest.approx(single, rel=1e-5)


def test_chunked_loss_equals_full_cross_entropy(tiny_model_dir, monkeypatch):
    import qwen_mlx.backends.torch_model as tm

    model = lora_model(tiny_model_dir, seed=1)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(5, 500, (2, 40))).long()
    pos = torch.arange(40).repeat(2, 1)
    mask = torch.from_numpy(rng.integers(0, 2, (2, 40))).long()
    monkeypatch.setattr(tm, "LOSS_CHUNK", 7)  # several chunks, the last one partial
    with torch.no_grad():
        chunked = TokenLoss(model)(ids, pos, mask)
        logits = model.get_base_model()(input_ids=ids, position_ids=pos, use_cache=False).logits
    targets = mask[:, 1:].bool()
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1][targets].float(), ids[:, 1:][targets], reduction="sum"
    )
    torch.testing.assert_close(chunked, full, atol=1e-3, rtol=1e-5)


def adapter_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_resume_gives_the_same_adapter_as_a_straight_run(tiny_model_dir, small_data, tmp_path):
    common = ["training.num_epochs=3", "lora.dropout=0.1", "training.gradient_accumulation_steps=2"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    straight = run_config(tiny_model_dir, small_data, run_a, *common, "training.max_steps=8")
    train(straight)
    first = run_config(tiny_model_dir, small_data, run_b, *common, "training.max_steps=4")
    train(first)
    first.training.max_steps = 8  # what `--resume RUN --set training.max_steps=8` does
    train(first, resume=True)
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_peft_reproduces_the_trainers_logits(tiny_model_dir, small_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = run_config(tiny_model_dir, small_data, tmp_path / "run", "training.max_steps=6")
    _, trained = train(cfg)
    ids = torch.randint(5, 500, (1, 30))
    with torch.no_grad():
        own = trained.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
        theirs = loaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(
            input_ids=ids
        ).logits
    torch.testing.assert_close(own, theirs, atol=1e-5, rtol=1e-5)
    assert (own - plain).abs().max() > 1e-3  # the adapter really changed the model
    config_json = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 8 and config_json["lora_alpha"] == 16
    assert sorted(config_json["target_modules"]) == sorted(cfg.lora.target_modules)


def test_four_bit_path_trains(tiny_model_dir, small_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = run_config(
        tiny_model_dir,
        small_data,
        tmp_path / "run",
        "model.quantization=4bit",
        "training.num_epochs=6",
    )
    train(cfg)
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.8 * curve[0]
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    assert f"{layer}.lora_A.weight" in adapter_weights(tmp_path / "run")


def test_four_bit_without_bitsandbytes_falls_back_with_one_line(monkeypatch):
    import qwen_mlx.backends.torch_model as tm

    monkeypatch.setattr(tm, "_bnb_available", lambda: False)
    used, note = quantization_plan("4bit", torch.device("cpu"))
    assert used == "none"
    assert "bitsandbytes" in note and "\n" not in note
    assert quantization_plan("none", torch.device("cpu")) == ("none", None)


def cli_sets(model_dir, data, *extra) -> list[str]:
    """`--set` arguments for a short CLI run on the tiny model."""
    sets = [
        f"model.path={model_dir}",
        "model.quantization=none",
        f"data.train_file={data}",
        "output.dir=run",
        "training.max_seq_length=256",
        *extra,
    ]
    return [x for s in sets for x in ("--set", s)]


def cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qwen_mlx", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_train_command_end_to_end_and_interrupt_free_resume_hint(
    tiny_model_dir, small_data, tmp_path
):
    args = [
        "train",
        "--backend",
        "torch",
        *cli_sets(tiny_model_dir, small_data, "training.max_steps=3"),
    ]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 1 and "--resume" in again.stderr


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["model.path=nowhere"], "model folder nowhere not found"),
        (["data.train_file=empty.jsonl"], "no usable training records"),
        (["lora.rank=zero"], "expected an integer"),
    ],
)
def test_bad_input_is_one_clear_line(change, needle, tiny_model_dir, small_data, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    sets = [f"model.path={tiny_model_dir}", f"data.train_file={small_data}", *change]
    result = cli(
        "train", "--backend", "torch", *[x for s in sets for x in ("--set", s)], cwd=tmp_path
    )
    assert result.returncode == 1
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_two_process_ddp_run_writes_one_adapter(tiny_model_dir, small_data, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29561",
        "-m",
        "qwen_mlx",
        "train",
        "--backend",
        "torch",
    ]
    cmd += cli_sets(tiny_model_dir, small_data, "training.max_steps=3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "×2 (DDP)" in done.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert logged_steps(tmp_path / "run") == [1, 2, 3]  # rank 0 alone logs


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(
    tiny_model_dir, small_data, tmp_path, sigint_as_in_a_terminal
):
    import signal
    import time

    sets = cli_sets(
        tiny_model_dir,
        small_data,
        "training.num_epochs=500",
        "training.batch_size=1",
        "training.gradient_accumulation_steps=1",
    )
    args = [sys.executable, "-m", "qwen_mlx", "train", "--backend", "torch", *sets]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Resume with: qwen-mlx train --resume run" in err
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    step = int(saved[-1].name.split("-")[1])
    assert step >= 2 and (saved[-1] / "optimizer.pt").is_file()
    resumed = cli(
        "train", "--resume", "run", "--set", f"training.max_steps={step + 2}", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {step}" in resumed.stdout  # "resuming from … (step N)"
    assert logged_steps(tmp_path / "run") == list(range(1, step + 3))  # no gap, no duplicate
