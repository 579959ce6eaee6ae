"""``qwen-mlx fuse``: an adapter merged into its base is the model PEFT's merge gives.

Users rely on: the fused folder loading anywhere a Hugging Face model loads, weights equal to
``merge_and_unload()``, the base's dtype kept, the base found from a run or adapter folder,
small memory whatever the model size, and nothing half-written on failure.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lora_helpers import hf_logits, make_peft_adapter, make_run

from qwen_mlx import tensor_io
from qwen_mlx.cli import cli
from qwen_mlx.errors import UserError
from qwen_mlx.export.fuse import fuse
from qwen_mlx.outputs import OUTPUT_MARK
from qwen_mlx.tensor_io import model_tensors

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

IDS = list(range(3, 60))


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("fuse") / "adapter")


def _state_dict(model_dir: Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).state_dict()


def _peft_merged(model_dir: Path, adapter: Path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


def test_fused_bf16_model_equals_peft_merge_and_stays_bf16(family, family_model_dir, tmp_path):
    # Every family: Qwen3's q/k norms are carried over as they are.
    adapter = make_peft_adapter(family_model_dir, tmp_path / "adapter")
    out = tmp_path / "fused"
    result = fuse(adapter, out, max_shard_bytes=100_000)  # small shards: exercise the index

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    assert {t.dtype for t in model_tensors(out).values()} == {"BF16"}
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (family_model_dir / name).read_bytes()
    assert result.fused == 14 and result.notes == []

    # PEFT merges a bf16 model in float32 and rounds to bf16, as fuse does: equal weights.
    ours = _state_dict(out, torch.bfloat16)
    merged = _peft_merged(family_model_dir, adapter, torch.bfloat16)
    assert ours.keys() == merged.keys()
    config = json.loads((family_model_dir / "config.json").read_text())
    assert set(family.tensor_shapes(config)) <= ours.keys()
    for name, tensor in merged.items():
        assert ours[name].dtype == torch.bfloat16
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def test_fused_float32_model_matches_peft_in_float32(tmp_path):
    from qwen_mlx.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "f32", dtype="float32", seed=3)
    adapter = make_peft_adapter(base, tmp_path / "adapter", rank=4, alpha=8)
    fuse(adapter, tmp_path / "fused")
    ours, merged = (
        _state_dict(tmp_path / "fused", torch.float32),
        _peft_merged(base, adapter, torch.float32),
    )
    for name, tensor in merged.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    np.testing.assert_allclose(
        hf_logits(tmp_path / "fused", IDS), hf_logits(base, IDS, adapter), atol=1e-5
    )


def test_rslora_and_per_module_alpha_are_honoured(tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(
        tiny_model_dir,
        tmp_path / "rs",
        rank=16,
        alpha=8,
        use_rslora=True,
        alpha_pattern={"down_proj": 3},
    )
    fuse(adapter, tmp_path / "fused")
    ours = _state_dict(tmp_path / "fused", torch.bfloat16)
    merged = _peft_merged(tiny_model_dir, adapter, torch.bfloat16)
    base = _state_dict(tiny_model_dir, torch.bfloat16)
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(ours[name], tensor, msg=name)  # bf16 tolerance: 1 rounding
        changed += not torch.equal(ours[name], base[name])
    assert changed == 14  # rsLoRA's alpha/√r (and down_proj's own alpha) did change them


def test_run_folder_finds_its_base_and_says_qlora_is_fused_into_full_precision(
    tiny_model_dir, adapter, tmp_path
):
    run = make_run(tmp_path / "run", tiny_model_dir, adapter, "model.quantization=4bit")
    result = CliRunner().invoke(cli, ["fuse", str(run), "-o", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    assert "4bit base" in result.output and "full-precision" in result.output
    assert "14 adapted weights fused" in result.output
    assert (tmp_path / "fused" / "model.safetensors").is_file()


def test_model_option_overrides_a_missing_base(tiny_model_dir, adapter, tmp_path):
    moved = tmp_path / "adapter"
    make_run(tmp_path / "run", tmp_path / "nowhere", adapter)
    runner = CliRunner()
    failed = runner.invoke(cli, ["fuse", str(tmp_path / "run"), "-o", str(tmp_path / "x")])
    assert failed.exit_code == 1
    assert "nowhere" in failed.output and "--model" in failed.output
    assert "Traceback" not in failed.output and not (tmp_path / "x").exists()

    (tmp_path / "run" / "adapter").rename(moved)  # a bare adapter folder works the same way
    args = ["fuse", str(moved), "--model", str(tiny_model_dir), "-o", str(tmp_path / "y")]
    assert runner.invoke(cli, args).exit_code == 0


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda tmp, adapter: tmp / "missing", "not found"),
        (lambda tmp, adapter: tmp, "neither a run folder"),
        (lambda tmp, adapter: _with_config(adapter, tmp, use_dora=True), "DoRA"),
        (lambda tmp, adapter: _with_config(adapter, tmp, peft_type="IA3"), "not a LoRA"),
    ],
    ids=["missing", "not-a-run", "dora", "not-lora"],
)
def test_bad_input_is_one_clear_line(setup, needle, adapter, tmp_path):
    target = setup(tmp_path, adapter)
    result = CliRunner().invoke(cli, ["fuse", str(target), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _with_config(adapter: Path, tmp: Path, **changes) -> Path:
    copy = tmp / "changed"
    copy.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text()) | changes
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    return copy


def test_adapter_for_another_model_is_refused(tmp_path, adapter):
    from qwen_mlx.tiny import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", hidden_size=96, num_heads=4)
    with pytest.raises(UserError, match="different model"):
        fuse(adapter, tmp_path / "out", model=wider)


def test_memory_stays_at_a_few_blocks_not_the_model(tmp_path, monkeypatch):
    from qwen_mlx.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", hidden_size=128, intermediate_size=512, num_layers=4)
    adapter = make_peft_adapter(base, tmp_path / "adapter", rank=2, alpha=4)
    monkeypatch.setattr(tensor_io, "BLOCK_ELEMENTS", 4096)
    model_bytes = sum(t.nbytes for t in model_tensors(base).values())
    fuse(adapter, tmp_path / "warm-up")  # first-call imports are not what we measure
    tracemalloc.start()
    try:
        fuse(adapter, tmp_path / "fused")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The adapter (float32) and a block or two are all that is held, never the model.
    assert peak < model_bytes / 5, f"peak {peak:,} bytes for a {model_bytes:,}-byte model"


def test_failure_leaves_no_half_written_folder(adapter, tmp_path, monkeypatch):
    import qwen_mlx.export.fuse as fuse_module

    def broken(*args):
        raise OSError("disk full")
        yield

    monkeypatch.setattr(fuse_module, "fused_blocks", broken)
    with pytest.raises(OSError):
        fuse(adapter, tmp_path / "fused")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- -o never loses a user's files

_WRITERS = {
    "fuse": lambda src, out: ["fuse", str(src), "-o", str(out)],
    "adapter convert": lambda src, out: [
        "adapter",
        "convert",
        str(src),
        "--to",
        "mlx-lm",
        "-o",
        str(out),
    ],
}


def _tree(folder: Path) -> dict[str, bytes]:
    """The files of ``folder`` but our record (it holds the files' modification times)."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != OUTPUT_MARK)
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.mark.parametrize("command", list(_WRITERS))
def test_output_into_a_run_folder_is_refused_even_with_force(
    command, tiny_model_dir, adapter, tmp_path
):
    run = make_run(tmp_path / "run", tiny_model_dir, adapter)
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _tree(run)
    for extra in ([], ["--force"]):
        result = CliRunner().invoke(cli, [*_WRITERS[command](run, run), *extra])
        assert result.exit_code == 1, result.output
        assert "training run folder" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert _tree(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (run / "data").mkdir()
    (run / "data" / "valid.jsonl").write_text("{}\n")
    inside = CliRunner().invoke(cli, [*_WRITERS[command](run, run / "data"), "--force"])
    assert inside.exit_code == 1 and "part of the training run" in inside.output
    assert (run / "data" / "valid.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("command", list(_WRITERS))
def test_a_folder_with_other_files_is_never_replaced_and_a_rerun_is(command, adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):  # --force replaces our outputs only, never a user's file
        refused = CliRunner().invoke(cli, [*_WRITERS[command](adapter, out), *extra])
        assert refused.exit_code == 1 and "notes.txt" in refused.output
        assert "move them away" in refused.output
    assert _tree(out) == {"notes.txt": b"mine"}

    (out / "notes.txt").unlink()
    assert CliRunner().invoke(cli, _WRITERS[command](adapter, out)).exit_code == 0
    first = _tree(out)
    again = CliRunner().invoke(cli, _WRITERS[command](adapter, out))  # its own earlier output
    assert again.exit_code == 0, again.output
    assert _tree(out) == first
    other = "adapter convert" if command == "fuse" else "fuse"
    refused = CliRunner().invoke(cli, _WRITERS[other](adapter, out))
    assert refused.exit_code == 1 and "--force" in refused.output
    assert CliRunner().invoke(cli, [*_WRITERS[other](adapter, out), "--force"]).exit_code == 0


def test_the_input_adapter_is_never_the_output(adapter, tmp_path):
    copy = tmp_path / "adapter"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (copy / name).write_bytes((adapter / name).read_bytes())
    result = CliRunner().invoke(cli, [*_WRITERS["fuse"](copy, copy), "--force"])
    assert result.exit_code == 1 and "input" in result.output
    assert sorted(_tree(copy)) == ["adapter_config.json", "adapter_model.safetensors"]
