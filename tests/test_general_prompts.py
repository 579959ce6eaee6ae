"""The general prompt set shipped with the package (qwen_mlx/datasets/general_prompts.jsonl,
``replay.general_prompts()``): replay prompts and held-out
prompts for the drift measure (issue 22 §3). Fast: json and the data loader only, no model.

The records are prompt-only (their last turn is the user's), which ``load_records`` refuses for
training ("last message must come from the assistant"). So the file's own schema is checked
here with json, and each conversation is checked to become a valid chat record once an answer
is appended, which is what ``data replay`` writes.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from qwen_mlx.data import load_records, normalize
from qwen_mlx.replay import HELDOUT, REPLAY, general_prompts, load_prompts

PROMPTS = general_prompts()
CATEGORIES = {
    "writing",
    "arithmetic",
    "reasoning",
    "code",
    "knowledge",
    "chat",
    "instruction_following",
}
LANGS = {"zh", "en"}
SPLITS = {"replay", "heldout"}
KEYS = {"id", "lang", "category", "split", "messages"}
PROMPT_ONLY = "last message must come from the assistant"
DOMAIN_WORDS = re.compile(r"报销|发票|reimburs|invoice", re.IGNORECASE)
NEAR_DUPLICATE = 0.6  # character 5-gram Jaccard, held-out vs replay
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def rows():
    lines = PROMPTS.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), "no blank lines"
    return [json.loads(line) for line in lines]


def text_of(row) -> str:
    return "\n".join(m["content"] for m in row["messages"])


def grams(text: str, n: int = 5) -> set[str]:
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


def test_schema(rows):
    assert 350 <= len(rows) <= 450
    for row in rows:
        where = row.get("id")
        assert set(row) == KEYS, where
        assert re.fullmatch(r"gp-\d{4}", row["id"]), where
        assert row["lang"] in LANGS, where
        assert row["category"] in CATEGORIES, where
        assert row["split"] in SPLITS, where
        messages = row["messages"]
        roles = [m["role"] for m in messages]
        assert all(set(m) == {"role", "content"} for m in messages), where
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        assert "system" not in roles[1:], where
        turns = roles[1:] if roles[0] == "system" else roles
        # user, assistant, user, …: alternating and ending with the prompt to answer
        assert turns == ["user", "assistant"] * (len(turns) // 2) + ["user"], where
        if row["lang"] == "zh":
            assert CJK.search(messages[-1]["content"]), where


def test_ids_unique_and_in_order(rows):
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids)
    assert ids == [f"gp-{n:04d}" for n in range(1, len(ids) + 1)]


def test_loader_sees_prompt_only_records_and_nothing_else_wrong(rows):
    records, report = load_records([PROMPTS])
    # Each line is either kept (should the loader one day take prompt-only records) or refused
    # for being prompt-only; never for anything else.
    assert {p.reason for p in report.problems} <= {PROMPT_ONLY}
    assert report.kept + report.skipped == len(rows)
    assert report.duplicates == 0
    assert all(r.data["messages"][-1]["role"] == "user" for r in records)


def test_every_prompt_is_a_valid_chat_record_once_answered(rows):
    for row in rows:
        answered = [*row["messages"], {"role": "assistant", "content": "answer"}]
        data, fmt = normalize({"messages": answered})
        assert fmt == "chat"
        assert data["messages"][:-1] == row["messages"], row["id"]


def test_balance_and_stratified_split(rows):
    langs = Counter(row["lang"] for row in rows)
    assert 0.55 <= langs["zh"] / len(rows) <= 0.65
    categories = Counter(row["category"] for row in rows)
    assert set(categories) == CATEGORIES
    assert max(categories.values()) - min(categories.values()) <= len(rows) // 20
    held = sum(row["split"] == "heldout" for row in rows) / len(rows)
    assert 0.2 <= held <= 0.3
    cells = Counter((row["split"], row["category"], row["lang"]) for row in rows)
    for split in SPLITS:
        for category in CATEGORIES:
            for lang in LANGS:
                assert cells[split, category, lang] >= 3, (split, category, lang)


def test_prompts_are_general_and_short(rows):
    for row in rows:
        assert not DOMAIN_WORDS.search(text_of(row)), row["id"]
    lengths = sorted(len(row["messages"][-1]["content"]) for row in rows)
    assert sum(n < 200 for n in lengths) >= 0.9 * len(lengths)
    assert lengths[-1] < 500


def test_no_exact_duplicates(rows):
    texts = [re.sub(r"\s+", " ", text_of(row).lower()).strip() for row in rows]
    assert len(set(texts)) == len(texts)


def test_heldout_has_no_near_duplicate_in_replay(rows):
    held = [(row["id"], grams(text_of(row))) for row in rows if row["split"] == "heldout"]
    replay = [(row["id"], grams(text_of(row))) for row in rows if row["split"] == "replay"]
    worst = (0.0, "", "")
    for h_id, h in held:
        for r_id, r in replay:
            score = len(h & r) / len(h | r)
            worst = max(worst, (score, h_id, r_id))
    assert worst[0] < NEAR_DUPLICATE, worst


def test_data_replay_and_eval_read_both_parts():
    replay, heldout = load_prompts(PROMPTS, REPLAY), load_prompts(PROMPTS, HELDOUT)
    assert len(replay) == 315 and len(heldout) == 105
    assert not {p.id for p in replay} & {p.id for p in heldout}
    assert all(p.messages[-1]["role"] == "user" for p in replay + heldout)
