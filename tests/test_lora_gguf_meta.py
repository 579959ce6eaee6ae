"""A LoRA GGUF says which base model it belongs to (``general.base_model.*``), as the LoRA
GGUFs llama.cpp's converter writes do, so tools and people can pair it with its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lora_helpers import make_peft_adapter

from qwen_mlx.export.gguf import export

gguf = pytest.importorskip("gguf")
pytest.importorskip("peft")


def _base_model_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if name.startswith("general.base_model.")
    }


def _adapter_naming(adapter: Path, out: Path, base_model: str) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("meta") / "adapter")


@pytest.mark.parametrize(
    "named", ["Qwen/Qwen2.5-0.5B-Instruct", "models/Qwen/Qwen2.5-0.5B-Instruct"]
)
def test_hub_base_is_named_with_organization_and_repo_url(named, adapter, tiny_model_dir, tmp_path):
    # An id, or the folder `qwen-mlx download` makes for it: the same base model.
    source = _adapter_naming(adapter, tmp_path / "adapter", named)
    lora = export(source, tmp_path / "lora.gguf", model=tiny_model_dir, lora_only=True).path
    assert _base_model_fields(lora) == {
        "general.base_model.count": 1,
        "general.base_model.0.name": "Qwen2.5 0.5B Instruct",
        "general.base_model.0.organization": "Qwen",
        "general.base_model.0.repo_url": "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct",
    }


def test_local_base_is_named_by_its_folder(adapter, tiny_model_dir, tmp_path):
    source = _adapter_naming(adapter, tmp_path / "adapter", str(tiny_model_dir))
    lora = export(source, tmp_path / "lora.gguf", lora_only=True).path
    assert _base_model_fields(lora) == {
        "general.base_model.count": 1,
        "general.base_model.0.name": tiny_model_dir.name,
    }
