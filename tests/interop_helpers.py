"""Other tools' own loaders, called the way those tools call them."""

from __future__ import annotations

import types
from pathlib import Path

import pytest


def mlx_lm_load(folder: Path, tokenizer, *, test: bool = False):
    """``mlx_lm.lora --data FOLDER --train [--test]`` as its loader sees it (train, valid,
    test); every record is tokenized the way its training loop does."""
    datasets = pytest.importorskip("mlx_lm.tuner.datasets")
    args = types.SimpleNamespace(data=str(folder), train=True, test=test, mask_prompt=False)
    splits = datasets.load_dataset(args, tokenizer)
    for split in splits:
        for i in range(len(split)):
            tokens, _ = split.process(split[i])
            assert len(tokens) > 1
    return splits
