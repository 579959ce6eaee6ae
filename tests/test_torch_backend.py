"""The PyTorch backend's own behaviour on the tiny model (CPU): the 4-bit fallback, the train
command, bad input, DDP and Ctrl-C. What every backend must do is in test_backend_contract.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from train_helpers import (  # noqa: E402
    logged_steps,
)

from qwen_mlx.backends.torch_model import (  # noqa: E402
    quantization_plan,
)


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
