"""Paths and public numbers the tests share (a helper module, not a test module).

Tests import helpers by bare module name (``from repo_helpers import REPO_ROOT``): pytest puts
``tests/`` on ``sys.path`` for its rootdir conftest, under ``pytest`` and ``python -m pytest``
alike, so no test module imports another and ``tests`` need not be a package.
"""

from __future__ import annotations

from pathlib import Path

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
