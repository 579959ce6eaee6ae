"""``data distill``'s records for the other trainers: LLaMA-Factory and mlx-lm.

``dataset_info.json`` declares ``train.jsonl`` and ``test.jsonl`` to LLaMA-Factory as they are
(alpaca formatting: instruction and input make the question, output the answer; the
``history`` column gives a follow-up its first turn, context included; a ``system`` column
when the records carry one), so ``--dataset_dir OUT --dataset distilled`` trains on them.
``chat/`` holds the same records as chat ``messages`` (normalized by :mod:`qwen_mlx.data`),
which ``mlx_lm.lora --data OUT/chat`` reads; an empty split gets no file there, since mlx-lm
fails on one.
"""

from __future__ import annotations

from qwen_mlx.data_formats import normalize

DATASET_INFO = "dataset_info.json"
CHAT_DIR = "chat"
CHAT_FILES = (f"{CHAT_DIR}/train.jsonl", f"{CHAT_DIR}/test.jsonl")
# The name of each split's dataset in dataset_info.json.
DATASET_NAMES = {"train": "distilled", "test": "distilled_test"}


def _entry(file_name: str, records: list[dict]) -> dict:
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    # LLaMA-Factory reads a declared column of every row: declared only where the file has it.
    for key in ("history", "system"):
        if any(key in r for r in records):
            columns[key] = key
    return {"file_name": file_name, "formatting": "alpaca", "columns": columns}


def dataset_info(splits: dict[str, list[dict]]) -> dict:
    """The dataset_info.json of the split files (one entry each, an empty split none)."""
    return {
        DATASET_NAMES[split]: _entry(f"{split}.jsonl", records)
        for split, records in splits.items()
        if records
    }


def chat_copies(splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """``chat/<split>.jsonl`` → its records as chat messages (``kind`` and ``source`` kept);
    an empty split has no file."""
    return {
        f"{CHAT_DIR}/{split}.jsonl": [normalize(r)[0] for r in records]
        for split, records in splits.items()
        if records
    }
