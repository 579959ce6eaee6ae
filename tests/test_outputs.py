"""Nothing a user made is written over: inputs, hand-made files, edits, runs at any depth.

Users rely on: rerunning a command (``data prepare``, ``fuse``, ``export``) replacing its
own earlier output and nothing else; ``--force`` never deleting a file we did not write or
a training run below the -o folder; and a killed command's temporary files being cleaned
up by the next run, while a live command's are left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from lora_helpers import make_peft_adapter, make_run

from qwen_mlx.cli import cli
from qwen_mlx.fsutil import atomic_path, remove_stale_temps
from qwen_mlx.outputs import OUTPUT_MARK

REPO_ROOT = Path(__file__).resolve().parent.parent


def _rows(n: int, tag: str = "q") -> str:
    return "".join(
        json.dumps({"instruction": f"{tag}{i} 出差住宿标准？", "output": f"答{i}"}) + "\n"
        for i in range(n)
    )


def _invoke(*args) -> object:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- data prepare


def test_prepare_never_writes_over_its_own_input(tmp_path):
    dp = tmp_path / "dp"
    dp.mkdir()
    (dp / "train.jsonl").write_text(_rows(40), encoding="utf-8")
    before = _tree(dp)
    for _ in range(3):  # the probe shrank the input 283 → 255 → 229 → 206 this way
        result = _invoke("data", "prepare", dp / "train.jsonl", "-o", dp)
        assert result.exit_code == 1 and "input" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert _tree(dp) == before


def test_prepare_leaves_a_hand_made_split_and_hand_edits_alone(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(_rows(40), encoding="utf-8")
    out = tmp_path / "dp"
    out.mkdir()
    (out / "valid.jsonl").write_text('{"hand": "made"}\n')
    refused = _invoke("data", "prepare", source, "-o", out)
    assert refused.exit_code == 1 and "valid.jsonl" in refused.output
    assert "not written by" in refused.output
    assert _tree(out) == {"valid.jsonl": b'{"hand": "made"}\n'}

    (out / "valid.jsonl").unlink()
    for _ in range(2):  # a rerun replaces its own earlier output
        assert _invoke("data", "prepare", source, "-o", out).exit_code == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 38

    time.sleep(0.01)  # a new modification time even on coarse clocks
    (out / "valid.jsonl").write_text('{"edited": "by hand"}\n')
    edited = _invoke("data", "prepare", source, "-o", out)
    assert edited.exit_code == 1 and "edited since" in edited.output
    assert (out / "valid.jsonl").read_text() == '{"edited": "by hand"}\n'


def test_prepare_into_a_runs_data_folder_is_refused(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(_rows(20), encoding="utf-8")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "data").mkdir()
    (run / "data" / "valid.jsonl").write_text('{"run": "split"}\n')
    for out in (run / "data", run / "data" / "more"):
        result = _invoke("data", "prepare", source, "-o", out)
        assert result.exit_code == 1 and "part of the training run" in result.output
    assert (run / "data" / "valid.jsonl").read_text() == '{"run": "split"}\n'
    assert not (run / "data" / "more").exists()


def test_prepare_writes_beside_other_files_and_a_killed_write_may_be_rerun(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(_rows(20), encoding="utf-8")
    out = tmp_path / "data"
    out.mkdir()
    (out / "rules.md").write_text("# 细则")
    assert _invoke("data", "prepare", source, "-o", out).exit_code == 0
    assert (out / "rules.md").read_text() == "# 细则"
    # a kill between writing train.jsonl and recording it: the record says "being written"
    record = json.loads((out / OUTPUT_MARK).read_text())
    record["files"]["train.jsonl"] = {"command": "data prepare", "size": None}
    (out / OUTPUT_MARK).write_text(json.dumps(record))
    (out / "train.jsonl").write_text("torn")
    assert _invoke("data", "prepare", source, "-o", out).exit_code == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 19


# ---------------------------------------------------------------- -o folders and --force


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    pytest.importorskip("peft")
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("outputs") / "adapter")


def test_force_never_deletes_a_run_further_down(tiny_model_dir, adapter, tmp_path):
    proj = tmp_path / "proj"
    make_run(proj / "outputs" / "run1", tiny_model_dir, adapter)
    before = _tree(proj)
    result = _invoke("fuse", adapter, "-o", proj, "--force")  # the probe lost proj/outputs/run1
    assert result.exit_code == 1 and "holds the training run" in result.output, result.output
    assert _tree(proj) == before


def test_force_replaces_our_outputs_but_never_a_users_file(adapter, tmp_path):
    out = tmp_path / "out"
    assert _invoke("adapter", "convert", adapter, "--to", "mlx-lm", "-o", out).exit_code == 0
    other = _invoke("fuse", adapter, "-o", out)  # another command's output: needs --force
    assert other.exit_code == 1 and "--force" in other.output
    assert _invoke("fuse", adapter, "-o", out, "--force").exit_code == 0
    assert (out / "config.json").is_file()

    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        result = _invoke("fuse", adapter, "-o", out, *extra)
        assert result.exit_code == 1 and "sub/notes.txt" in result.output
        assert "never deletes" in result.output
    assert (out / "sub" / "notes.txt").read_text() == "mine"


def test_a_symlinked_output_folder_is_written_where_it_points(adapter, tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    assert _invoke("adapter", "convert", adapter, "--to", "mlx-lm", "-o", real).exit_code == 0
    link.symlink_to(real, target_is_directory=True)
    assert _invoke("fuse", adapter, "-o", link, "--force").exit_code == 0
    assert link.is_symlink() and (real / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.*.old


# ---------------------------------------------------------------- export


def test_export_to_a_modelfile_name_is_refused(tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    result = _invoke("export", "--model", tiny_model_dir, "-o", tmp_path / "m.Modelfile")
    assert result.exit_code == 1 and ".gguf" in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_never_replaces_a_hand_edited_modelfile_or_a_foreign_gguf(tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    args = ("export", "--model", tiny_model_dir, "-o", out, "--quant", "q8_0")
    assert _invoke(*args).exit_code == 0
    assert _invoke(*args).exit_code == 0  # its own earlier export: replaced
    modelfile = tmp_path / "m.Modelfile"
    edited = modelfile.read_text() + "PARAMETER temperature 0.2\n"
    modelfile.write_text(edited)
    gguf_before = out.read_bytes()
    result = _invoke(*args)
    assert result.exit_code == 1 and "m.Modelfile was edited since" in result.output
    assert modelfile.read_text() == edited and out.read_bytes() == gguf_before

    downloaded = tmp_path / "downloaded.gguf"
    downloaded.write_bytes(gguf_before)
    theirs = _invoke("export", "--model", tiny_model_dir, "-o", downloaded)
    assert theirs.exit_code == 1 and "not written by" in theirs.output
    assert not (tmp_path / "downloaded.Modelfile").exists()


# ---------------------------------------------------------------- kill -9 leftovers

_KILLED = """
import sys, time
from pathlib import Path
import qwen_mlx.{module} as target

STARTED = Path(sys.argv[1])

def hang(*args, **kwargs):
    STARTED.write_text("started")
    time.sleep(600)

target.{function} = hang
from qwen_mlx.cli import main
sys.argv = ["qwen-mlx", *sys.argv[2:]]
main()
"""


def _kill_mid_way(tmp_path: Path, module: str, function: str, args: list) -> None:
    """Run a command that hangs inside ``module.function``, then kill -9 it there."""
    started = tmp_path / "started"
    script = textwrap.dedent(_KILLED.format(module=module, function=function))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(started), *map(str, args)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "never got there"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    started.unlink()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("module", "function", "quant"),
    [("export.gguf", "write_model_gguf", "f16"), ("export.gguf", "write_model_gguf", "q4_k_m")],
)
def test_a_killed_export_leaves_nothing_after_the_next_one(
    tiny_model_dir, tmp_path, module, function, quant
):
    pytest.importorskip("gguf")
    if quant == "q4_k_m":
        pytest.importorskip("llama_cpp")
    out_dir = tmp_path / "out"
    args = ["export", "--model", tiny_model_dir, "-o", out_dir / "m.gguf", "--quant", quant]
    _kill_mid_way(tmp_path, module, function, args)
    left = [name for name in _hidden(out_dir) if name != OUTPUT_MARK]
    assert left and all(name.endswith(".tmp") for name in left), left  # what the probe saw
    assert _invoke(*args).exit_code == 0
    assert _hidden(out_dir) == [OUTPUT_MARK]


def test_a_killed_fuse_leaves_nothing_after_the_next_one(adapter, tmp_path):
    out = tmp_path / "fused"
    args = ["fuse", adapter, "-o", out]
    _kill_mid_way(tmp_path, "export.fuse", "fused_blocks", args)
    assert any(name.startswith(".fused.") for name in _hidden(tmp_path))
    assert _invoke(*args).exit_code == 0
    assert _hidden(tmp_path) == []


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    target = tmp_path / "m.gguf"
    with atomic_path(target) as tmp:
        tmp.write_text("being written")
        assert remove_stale_temps(target) == [] and tmp.exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    leftover = tmp_path / f".m.gguf.{dead.stdout.strip()}.abcd1234.tmp"
    leftover.write_text("torn")
    other = tmp_path / f".notes.txt.{dead.stdout.strip()}.abcd1234.tmp"
    other.write_text("not this target's")
    assert remove_stale_temps(target) == [leftover] and other.exists()
    assert os.path.exists(other)
