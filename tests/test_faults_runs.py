"""Faults around training runs and exports: kill -9, a full disk, a read-only folder, corrupt
checkpoints, a resume that changes the run.

Users rely on: a run killed at any moment (even while a checkpoint is being written) resuming
to the very adapter a straight run gives; a full disk or an unwritable folder stopping any
writer with one ``Error:`` line naming the path and the cause, with what was saved before
still usable; a damaged checkpoint being set aside for the newest intact one; and a resumed
run refusing changes that would make it compute something else.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from disk_faults import CAUSES, CODES, FaultyDisk, under
from lora_helpers import make_peft_adapter
from train_helpers import logged_steps, losses

from qwen_mlx.cli import cli

pytest.importorskip("torch")
pytest.importorskip("peft")

STEPS = 6
SETTINGS = [
    "model.quantization=none",
    "training.max_seq_length=256",
    "training.batch_size=2",
    "training.gradient_accumulation_steps=1",
    "training.num_epochs=3",
    "training.warmup_steps=2",
    "training.learning_rate=5e-3",
    "lora.rank=8",
    "lora.alpha=16",
    "lora.dropout=0.1",
    "data.valid_ratio=0.2",
]


def train_args(model: Path, data: Path, run: Path, *extra: str) -> list[str]:
    sets = [
        f"model.path={model}",
        f"data.train_file={data}",
        f"output.dir={run}",
        *SETTINGS,
        f"training.max_steps={STEPS}",
        "training.save_every=2",
        *extra,
    ]
    return ["train", "--backend", "torch", *[x for s in sets for x in ("--set", s)]]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def adapter_of(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_run(run: Path, straight: Path) -> None:
    """Bit for bit the adapter (and the logged losses) of the straight run."""
    ours, theirs = adapter_of(run), adapter_of(straight)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert losses(run) == losses(straight)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old")))


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, small_data, tmp_path_factory) -> Path:
    """A run trained start to end without a fault, in this process."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = invoke(train_args(tiny_model_dir, small_data, run))
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def halfway(tiny_model_dir, small_data, tmp_path_factory) -> Path:
    """A run stopped after step 4 (checkpoints step-2 and step-4); copy it before changing."""
    run = tmp_path_factory.mktemp("halfway") / "run"
    result = invoke([*train_args(tiny_model_dir, small_data, run), "--set", "training.max_steps=4"])
    assert result.exit_code == 0, result.output
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def resume(run: Path, *extra: str):
    return invoke(["train", "--resume", run, "--set", f"training.max_steps={STEPS}", *extra])


# ---------------------------------------------------------------- kill -9

_DIE_IN_A_SAVE = r"""
import dataclasses, json, os, signal, sys
from qwen_mlx import checkpoints, fsutil
from qwen_mlx.cli import main

step, moment = int(sys.argv[1]), sys.argv[2]
save = checkpoints.save

def save_or_die(run_dir, state, write_backend_state):
    if state.step != step:
        return save(run_dir, state, write_backend_state)
    with fsutil.atomic_dir(checkpoints.checkpoint_dir(run_dir, step)) as tmp:
        write_backend_state(tmp)
        if moment == "mid-file":  # the kill lands while the optimizer file is half written
            data = (tmp / "optimizer.pt").read_bytes()
            (tmp / "optimizer.pt").write_bytes(data[: len(data) // 2])
        else:  # "unrenamed": every file written, the folder not yet renamed into place
            state_text = json.dumps(dataclasses.asdict(state))
            (tmp / checkpoints.STATE_FILE).write_text(state_text)
        os.kill(os.getpid(), signal.SIGKILL)

checkpoints.save = save_or_die
sys.argv = ["qwen-mlx", *sys.argv[3:]]
main()
"""


def _python(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _kill_at_step(args: list[str], run: Path, step: int) -> None:
    """Start training and kill -9 it as soon as step ``step`` is logged (wherever it is then:
    in the next step, in a checkpoint write, in the metrics)."""
    proc = _python("-m", "qwen_mlx", *args, cwd=run.parent)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


def _die_in_a_save(args: list[str], run: Path, step: int, moment: str) -> None:
    proc = _python("-c", _DIE_IN_A_SAVE, str(step), moment, *args, cwd=run.parent)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


def test_kill_9_anywhere_then_resume_equals_a_straight_run(tiny_model_dir, small_data, tmp_path):
    # Three kills of one run, the later ones of its resumes: at a random step (wherever the
    # process then is), in the middle of a checkpoint's optimizer file, and with a checkpoint
    # complete but not yet renamed into place. Then a last resume runs to the end. Every
    # process is separate, as for a user, so the straight run is one too.
    straight, run = tmp_path / "straight", tmp_path / "run"
    _finish(
        _python("-m", "qwen_mlx", *train_args(tiny_model_dir, small_data, straight), cwd=tmp_path)
    )
    rng = random.Random(15)
    killed = rng.randint(2, STEPS - 2)  # from step 2 on, a checkpoint exists to resume from
    torn = rng.randint(killed + 1, STEPS - 1)
    args = train_args(tiny_model_dir, small_data, run, "training.save_every=1")
    _kill_at_step(args, run, killed)
    resume_args = ["train", "--resume", "run"]
    _die_in_a_save(resume_args, run, torn, "mid-file")
    _die_in_a_save(resume_args, run, STEPS - 1, "unrenamed")
    assert leftovers(run / "checkpoints"), "the kill left no half-written checkpoint to clean"
    _finish(_python("-m", "qwen_mlx", *resume_args, cwd=tmp_path))
    assert leftovers(run) == [], f"killed at step {killed}, torn at {torn}"
    assert_same_run(run, straight)


# ---------------------------------------------------------------- full disk, read-only folder


@pytest.mark.parametrize("fault", list(CODES))
def test_a_new_run_in_a_full_or_read_only_folder_is_one_line(
    fault, tiny_model_dir, small_data, tmp_path, monkeypatch
):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    disk = FaultyDisk(monkeypatch, CODES[fault], under(outputs))
    line = one_error_line(invoke(train_args(tiny_model_dir, small_data, outputs / "run")))
    assert str(outputs / "run") in line and CAUSES[CODES[fault]] in line, line
    assert disk.failed and leftovers(outputs) == []


# Where a write fails during a run: the checkpoints, metrics.jsonl, the final adapter.
WRITERS = {
    "checkpoint": lambda run: under(run / "checkpoints"),
    "metrics": lambda run: lambda path: path == str(run / "metrics.jsonl"),
    "adapter": lambda run: lambda path: f"{os.sep}.adapter." in path,
}


@pytest.mark.parametrize("fault", list(CODES))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_disk_fault_during_a_run_stops_it_in_one_line_and_keeps_what_was_saved(
    writer, fault, tiny_model_dir, small_data, straight, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    first = run / "checkpoints" / "step-000002"
    with monkeypatch.context() as patch:
        disk = FaultyDisk(patch, CODES[fault], WRITERS[writer](run), armed=first.is_dir)
        line = one_error_line(invoke(train_args(tiny_model_dir, small_data, run)))
    assert disk.failed and CAUSES[CODES[fault]] in line and f"cannot write {run}" in line, line
    if writer != "adapter":  # the adapter is written after the last checkpoint
        assert "the last checkpoint is" in line and "--resume" in line, line
    assert leftovers(run) == []
    # Space freed: the run goes on from its last checkpoint to the straight run's adapter.
    assert resume(run).exit_code == 0
    assert_same_run(run, straight)


@pytest.mark.parametrize("fault", list(CODES))
def test_a_resume_in_a_full_or_read_only_folder_is_one_line_and_changes_nothing(
    fault, halfway, tmp_path, monkeypatch
):
    run = copy_of(halfway, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with monkeypatch.context() as patch:
        disk = FaultyDisk(patch, CODES[fault], under(run))
        line = one_error_line(resume(run))
    assert disk.failed and CAUSES[CODES[fault]] in line and f"cannot write {run}" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _out_writers(tiny_model_dir: Path, adapter: Path, out: Path) -> dict[str, list[str]]:
    gguf = out.with_suffix(".gguf")
    return {
        "fuse": ["fuse", adapter, "--model", tiny_model_dir, "-o", out],
        "adapter convert": ["adapter", "convert", adapter, "--to", "mlx-lm", "-o", out],
        "export": ["export", adapter, "--model", tiny_model_dir, "-o", gguf, "--quant", "q8_0"],
        "export --lora-only": [
            "export",
            adapter,
            "--model",
            tiny_model_dir,
            "-o",
            gguf,
            "--lora-only",
        ],
    }


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("exports") / "adapter")


@pytest.mark.parametrize("fault", list(CODES))
@pytest.mark.parametrize("command", list(_out_writers(Path(), Path(), Path("x"))))
def test_a_disk_fault_during_an_export_keeps_the_previous_output(
    command, fault, tiny_model_dir, adapter, tmp_path, monkeypatch
):
    if command.startswith("export"):
        pytest.importorskip("gguf")
    out = tmp_path / "out" / "model"
    args = _out_writers(tiny_model_dir, adapter, out)[command]
    assert invoke(args).exit_code == 0
    before = {p: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()}
    with monkeypatch.context() as patch:
        disk = FaultyDisk(patch, CODES[fault], under(out.parent))
        line = one_error_line(invoke(args))
    assert disk.failed and CAUSES[CODES[fault]] in line and f"cannot write {out}" in line, line
    assert {p: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- corrupt checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated adapter": ("adapter/adapter_model.safetensors", _truncate),
    "garbage optimizer": ("optimizer.pt", lambda p: p.write_bytes(os.urandom(4096))),
    "truncated optimizer": ("optimizer.pt", _truncate),
    "bad state.json": ("state.json", lambda p: p.write_text('{"step": 4, "ep')),
    "missing rng": ("rng.pt", Path.unlink),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_one_before_resumes(
    kind, halfway, straight, tmp_path
):
    run = copy_of(halfway, tmp_path)
    name, corrupt = CORRUPTIONS[kind]
    corrupt(run / "checkpoints" / "step-000004" / name)
    leftover = run / "checkpoints" / ".step-000006.k1l2m3n4.tmp"  # as a killed save leaves it
    leftover.mkdir()
    result = resume(run)
    assert result.exit_code == 0, result.output
    note = next(line for line in result.output.splitlines() if "aside" in line)
    assert f"step-000004/{name}" in note and "resuming from step-000002" in note, note
    assert "resuming from" in result.output and "(step 2)" in result.output
    assert (run / "checkpoints" / "step-000004.corrupt" / "optimizer.pt").is_file()
    assert not leftover.exists()
    assert_same_run(run, straight)


def test_when_no_checkpoint_is_intact_resume_stops_in_one_line_and_moves_nothing(halfway, tmp_path):
    run = copy_of(halfway, tmp_path)
    for step in ("step-000002", "step-000004"):
        (run / "checkpoints" / step / "rng.pt").unlink()
    line = one_error_line(resume(run))
    assert "no intact checkpoint" in line and "step-000004/rng.pt is missing" in line, line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]


# ---------------------------------------------------------------- a resume that changes the run


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--set", "training.learning_rate=1e-4"],
            "training.learning_rate changed (0.005 → 0.0001)",
        ),
        (["--set", "lora.rank=16"], "lora.rank changed (8 → 16)"),
        (["--preset", "quick"], "training.num_epochs changed (3 → 1)"),
        (["--set", "training.batch_size=4"], "training.batch_size changed (2 → 4)"),
    ],
    ids=["learning-rate", "rank", "preset", "batch-size"],
)
def test_a_resume_that_changes_what_is_computed_is_refused(args, needle, halfway, tmp_path):
    run = copy_of(halfway, tmp_path)
    saved = (run / "config.yaml").read_text()
    line = one_error_line(resume(run, *args))
    assert needle in line and "Start a new run" in line, line
    assert (run / "config.yaml").read_text() == saved  # the run still describes itself


def test_a_config_file_given_with_resume_is_applied_and_checked(halfway, tmp_path):
    run = copy_of(halfway, tmp_path)
    changed = (run / "config.yaml").read_text().replace("num_epochs: 3", "num_epochs: 5")
    (tmp_path / "other.yaml").write_text(changed)
    line = one_error_line(resume(run, "-c", tmp_path / "other.yaml"))
    assert "training.num_epochs changed (3 → 5)" in line, line


def test_a_resume_may_change_when_it_stops_saves_and_validates(halfway, straight, tmp_path):
    run = copy_of(halfway, tmp_path)
    result = resume(
        run,
        "--set",
        "training.eval_every=1",
        "--set",
        "training.save_every=1",
        "--set",
        "distill.questions_per_chunk=2",  # the distill step's settings do not touch training
        "--set",
        "chat.enable_thinking=true",  # nor does how the tuned model is prompted
        "-c",
        run / "config.yaml",
    )
    assert result.exit_code == 0, result.output
    assert "save_every: 1" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "step-000005").is_dir()  # saved every step now
    assert_same_run(run, straight)


def test_run_files_have_the_usual_permissions(halfway):
    expected = (halfway / "config.yaml").stat().st_mode & 0o777
    files = [p for p in halfway.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    assert {str(p.relative_to(halfway)): p.stat().st_mode & 0o777 for p in files} == {
        str(p.relative_to(halfway)): expected for p in files
    }
