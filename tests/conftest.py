"""Shared fixtures: the tiny Qwen2 model is built once per test session.

Every backend and command loads this folder through the same code a downloaded
Qwen2.5 model goes through, so tests exercise the real loading paths offline.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TRAIN = REPO_ROOT / "data" / "报销细则_distilled_chunked.jsonl"
BUNDLED_TEST = REPO_ROOT / "data" / "报销细则_test.jsonl"
QWEN25_3B = {  # public config.json numbers of Qwen2.5-3B
    "model_type": "qwen2",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny Qwen2.5-style model folder (random weights, BPE tokenizer, ChatML)."""
    from qwen_mlx.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    data = BUNDLED_TRAIN if BUNDLED_TRAIN.exists() else None
    build_tiny_model(out, data_file=data)
    return out


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 model folder (``tiny-model --arch qwen3``: q/k norms, Qwen3's template)."""
    from qwen_mlx.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", arch="qwen3")


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_dir):
    """The tiny Qwen3's tokenizer, loaded through transformers."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen3_dir)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """Twelve bundled records (the shortest) as a training file."""
    from tests.train_helpers import write_short_records

    return write_short_records(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded through transformers like a real one."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def sigint_as_in_a_terminal():
    """Ctrl-C as an interactive shell delivers it, however pytest was started.

    A background job of a script (``pytest &`` in ``bash -c``) starts with SIGINT ignored,
    which children inherit and our commands then respect; inside this fixture the test
    process (Python's KeyboardInterrupt) and any child it starts (default action) have
    SIGINT as a foreground job in a terminal has. Restored afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def pytest_collection_modifyitems(config, items):
    """Skip hardware- and network-bound tests cleanly where they cannot run."""
    import os

    needs_gpu = [item for item in items if "gpu" in item.keywords]
    if needs_gpu and not _has_cuda():
        for item in needs_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if os.environ.get("QWEN_MLX_NETWORK") != "1":
        for item in items:
            if "network" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs network (set QWEN_MLX_NETWORK=1)"))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
