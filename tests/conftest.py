"""Shared fixtures: each family's tiny model is built once per test session.

Every backend and command loads these folders through the same code a downloaded
Qwen2.5 or Qwen3 model goes through, so tests exercise the real loading paths offline.
``family`` / ``family_model_dir`` run a test once per family in ``FAMILIES``.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from repo_helpers import BUNDLED_TRAIN

from qwen_mlx.families import FAMILIES, QWEN2, QWEN3, Family


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Callable[[str], Path]:
    """Family name -> that family's tiny model folder (``build_tiny_model(arch=name)``, its
    tokenizer learned on the bundled data), each built once per session on first use."""
    from qwen_mlx.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    data = BUNDLED_TRAIN if BUNDLED_TRAIN.exists() else None

    @functools.cache
    def build(name: str) -> Path:
        return build_tiny_model(root / f"tiny-{name}", data_file=data, arch=name)

    return build


@pytest.fixture(scope="session", params=FAMILIES, ids=lambda family: family.name)
def family(request) -> Family:
    """Each model family in ``FAMILIES``: a test that takes it runs once per family."""
    return request.param


@pytest.fixture(scope="session")
def family_model_dir(family, tiny_models) -> Path:
    """The tiny model of each family (Qwen3's: q/k norms, head_dim twice hidden/heads)."""
    return tiny_models(family.name)


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_models) -> Callable[[str], Any]:
    """Family name -> its tiny model's tokenizer, loaded through transformers like a real one
    (once per session)."""
    transformers = pytest.importorskip("transformers")
    return functools.cache(
        lambda name: transformers.AutoTokenizer.from_pretrained(tiny_models(name))
    )


@pytest.fixture(scope="session")
def family_tokenizer(family, tiny_tokenizers):
    """The tokenizer of each family's tiny model."""
    return tiny_tokenizers(family.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models) -> Path:
    """A complete tiny Qwen2.5-style model folder (random weights, BPE tokenizer, ChatML)."""
    return tiny_models(QWEN2.name)


@pytest.fixture(scope="session")
def qwen3_dir(tiny_models) -> Path:
    """The tiny Qwen3 folder (``tiny-model --arch qwen3``: q/k norms, Qwen3's template)."""
    return tiny_models(QWEN3.name)


@pytest.fixture(scope="session")
def qwen3_tokenizer(tiny_tokenizers):
    """The tiny Qwen3's tokenizer."""
    return tiny_tokenizers(QWEN3.name)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """Twelve bundled records (the shortest) as a training file."""
    from train_helpers import write_short_records

    return write_short_records(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="session")
def trained_runs(tiny_models, small_data, tmp_path_factory):
    """(backend, family name, run name in ``train_helpers.RUNS``) -> ``Trained``: that LoRA
    run of the family's tiny model on the backend, trained once per session (the contract
    suite reads them; the Qwen3 tests prompt from one)."""
    from train_helpers import RUNS, Trained, run_config, start_run

    root = tmp_path_factory.mktemp("runs")

    @functools.cache
    def trained(backend: str, name: str, kind: str):
        run, model_dir = root / f"{name}-{backend}-{kind}", tiny_models(name)
        result, model = start_run(run_config(model_dir, small_data, run, *RUNS[kind]), backend)
        return Trained(run, model_dir, result, model)

    return trained


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizers):
    """The tiny Qwen2's tokenizer."""
    return tiny_tokenizers(QWEN2.name)


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
