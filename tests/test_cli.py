"""The command line: help everywhere, one clear line for user mistakes, light imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qwen_mlx.backends import BACKENDS, CHOICES, get_backend, probe
from qwen_mlx.cli import cli
from qwen_mlx.errors import UserError

COMMANDS = [
    [],
    ["check"],
    ["download"],
    ["data"],
    ["data", "prepare"],
    ["data", "stats"],
    ["train"],
    ["tiny-model"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "qwen-mlx")
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: " in result.output
    # A real description, not just the usage line.
    assert len(result.output.splitlines()) > 4


def run_cli(*args, cwd=None):
    """Run the installed console script the way a user does."""
    return subprocess.run(
        [sys.executable, "-m", "qwen_mlx", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--set", "training.num_epoch=1"], "did you mean 'training.num_epochs'"),
        (["train", "--backend", "tensorflow"], "Invalid value for '--backend'"),
        (["train", "--set", "model.path=nowhere"], "qwen-mlx download"),
        (["data", "prepare", "missing.jsonl"], "data file not found: missing.jsonl"),
        (["data", "stats", "missing.jsonl"], "data file not found"),
        (["download", "not-a-repo-id"], "not a repository id"),
        (["tiny-model", "out", "--data", "missing.jsonl"], "missing.jsonl"),
        (["check", "-c", "missing.yaml"], "config file not found"),
    ],
)
def test_user_mistakes_give_one_line_and_nonzero_exit(args, needle, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if args[0] != "check":  # check prints its whole list; elsewhere one "Error:" line
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and needle in errors[0], result.stderr


def test_strict_prepare_fails_on_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n', encoding="utf-8"
    )
    result = run_cli("data", "prepare", str(path), "-o", str(tmp_path / "out"), "--strict")
    assert result.returncode == 1
    assert f"{path}:2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing written half-way


def test_importing_qwen_mlx_does_not_import_torch_or_mlx():
    code = (
        "import sys, qwen_mlx, qwen_mlx.cli, qwen_mlx.config, qwen_mlx.data, qwen_mlx.tokens, "
        "qwen_mlx.check, qwen_mlx.tiny, qwen_mlx.backends, qwen_mlx.backends.base\n"
        "heavy = [m for m in ('torch', 'mlx', 'mlx_lm', 'transformers') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_command_modules_are_added_explicitly_not_by_import_side_effects():
    # cli_models must not need the group (nor register on it) when imported on its own, and
    # the CLI does not pull in numpy to list the export --quant choices.
    code = (
        "import sys, qwen_mlx.cli_models, qwen_mlx.cli_distill\n"
        "print('qwen_mlx.cli' in sys.modules)\n"
        "import qwen_mlx.cli\n"
        "print('numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    from qwen_mlx import cli_distill, cli_models
    from qwen_mlx.export.gguf_quants import QUANT_CHOICES

    assert cli_models.COMMANDS
    assert all(cli.commands[command.name] is command for command in cli_models.COMMANDS)
    assert cli.commands["data"].commands["distill"] is cli_distill.data_distill
    assert "|".join(QUANT_CHOICES) in CliRunner().invoke(cli, ["export", "--help"]).output


def test_backend_choices_are_the_registry_keys():
    assert set(CHOICES) == {"auto", *BACKENDS}
    train_help = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "[auto|mlx|torch]" in train_help


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(UserError, match="choose one of auto, mlx, torch"):
        get_backend("jax")
    with pytest.raises(UserError, match="choose one of"):
        probe("jax")


def test_probe_reports_versions_of_what_it_found():
    found = probe("torch")
    if found.ok:
        assert "torch" in found.packages and found.device in ("cuda", "mps", "cpu")
    else:
        assert "pip install" in found.reason


def test_data_stats_counts_tokens_and_truncation(tiny_model_dir, tmp_path):
    rows = [
        {"instruction": "差旅费报销需要哪些材料？", "output": "发票、审批单。" * (i + 1)}
        for i in range(20)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")

    def run(max_len: int) -> dict:
        args = ["data", "stats", str(path), "--model", str(tiny_model_dir), "--json"]
        result = CliRunner().invoke(cli, [*args, "--max-seq-length", str(max_len)])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    roomy = run(4096)
    assert roomy["records"] == 20 and roomy["formats"] == {"alpaca": 20}
    lengths = roomy["tokens"]
    assert lengths["min"] < lengths["p50"] <= lengths["p90"] < lengths["max"]  # answers grow
    assert roomy["truncated"] == 0
    assert roomy["packed_rows"] < 20  # short samples share rows
    tight = run(lengths["p50"])
    assert 0 < tight["truncated"] < 20  # the longer half no longer fits


def test_tiny_model_command_builds_a_loadable_folder(tmp_path):
    result = CliRunner().invoke(cli, ["tiny-model", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    check = CliRunner().invoke(
        cli,
        [
            "check",
            "--set",
            f"model.path={tmp_path / 'tiny'}",
            "--set",
            "data.train_file=nope.jsonl",
        ],
    )
    assert "✓ model: weights" in check.output
