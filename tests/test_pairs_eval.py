"""``eval --pairs``: preference accuracy and reward margin on held-out pairs.

Users rely on: the figure being DPO's implicit reward comparison, (log π(chosen) − log
π_ref(chosen)) > (log π(rejected) − log π_ref(rejected)) with π_ref the base (the adapter
off), summed over the answer tokens only; an adapter that changes nothing scoring 0 (no
pair preferred, margin 0); swapping chosen and rejected mirroring the figures; every pair
format read, the pairs ``data pairs`` writes included; eval reporting it beside its scores
(also for a test file of pairs); bad pair files stopping in one line. The tiny random model
and random adapters prove the measuring, never quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lora_helpers import hf_logits, make_peft_adapter, make_run
from rich.console import Console

from qwen_mlx.errors import UserError

QUIET = Console(quiet=True)
QUESTIONS = ["出差住宿标准是多少？", "市内交通费怎么报销？", "会议费的上限是多少？"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Two runs of the tiny model: one whose adapter moves it, one whose adapter is a no-op
    (B = 0), and pairs of the moved model's greedy answer (chosen) against its base's."""
    pytest.importorskip("peft")
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.inference import answer_all, open_engine

    root = tmp_path_factory.mktemp("prefs")
    moved = make_run(
        root / "moved", tiny_model_dir, make_peft_adapter(tiny_model_dir, root / "a", b_std=0.1)
    )
    still_adapter = make_peft_adapter(tiny_model_dir, root / "b", b_std=0.0)
    still = make_run(root / "still", tiny_model_dir, still_adapter)
    engine = open_engine(moved, backend="torch")
    settings = GenerationSettings(max_tokens=6, temperature=0.0)
    asked = [[{"role": "user", "content": q}] for q in QUESTIONS]
    tuned, base = [""] * 3, [""] * 3
    for i, reply in answer_all(engine, asked, settings, 1):
        tuned[i] = reply.text
    with engine.adapter_disabled():
        for i, reply in answer_all(engine, asked, settings, 1):
            base[i] = reply.text
    assert all(a != b for a, b in zip(tuned, base, strict=True))  # the adapter changed them
    rows = [
        {"prompt": [m], "chosen": [_turn(a)], "rejected": [_turn(b)]}
        for [m], a, b in zip(asked, tuned, base, strict=True)
    ]
    return moved, still, rows


def _turn(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    return path


def _measure(run: Path, path: Path):
    from qwen_mlx.eval.preference import preference_accuracy
    from qwen_mlx.inference import open_engine

    return preference_accuracy(open_engine(run, backend="torch"), path, 256)


def _answer_log_prob(model_dir: Path, adapter: Path | None, sample) -> float:
    """transformers' (+ PEFT's) summed log-probability of a sample's target tokens."""
    logits = hf_logits(model_dir, sample.input_ids, adapter).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ids, mask = np.array(sample.input_ids), np.array(sample.loss_mask)
    targets = np.flatnonzero(mask[1:])
    return float(logp[targets, ids[targets + 1]].sum())


def test_preference_is_dpos_implicit_reward_on_the_answer_tokens(runs, tiny_model_dir, tmp_path):
    """The engine's figures equal DPO's formula computed with transformers + PEFT directly."""
    from qwen_mlx.eval.preference import encode_pairs, read_pairs
    from qwen_mlx.tokens import load_tokenizer

    moved, _, rows = runs
    path = _write(tmp_path / "pairs.jsonl", rows)
    got = _measure(moved, path)
    tokenizer = load_tokenizer(tiny_model_dir)
    samples, skipped = encode_pairs(tokenizer, read_pairs(path), 256)
    assert skipped == 0 and len(samples) == 3
    rewards = []
    for pair, row in zip(samples, rows, strict=True):
        for sample, side in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
            # the targets are the answer and its end of turn, nothing of the prompt
            targets = [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
            assert tokenizer.decode(targets) == row[side][0]["content"] + "<|im_end|>"
        tuned = [
            _answer_log_prob(tiny_model_dir, moved / "adapter", s)
            for s in (pair.chosen, pair.rejected)
        ]
        base = [_answer_log_prob(tiny_model_dir, None, s) for s in (pair.chosen, pair.rejected)]
        rewards.append((tuned[0] - base[0], tuned[1] - base[1]))
    accuracy = 100 * sum(c > r for c, r in rewards) / 3
    margin = sum(c - r for c, r in rewards) / 3
    assert got.accuracy == pytest.approx(accuracy)
    assert got.margin == pytest.approx(margin, abs=1e-4)
    assert got.chosen_reward == pytest.approx(0.1 * sum(c for c, _ in rewards) / 3, abs=1e-4)
    assert got.beta == 0.1 and got.reward_margin == pytest.approx(0.1 * got.margin)
    # the tuned model's own answers against its base's: the tuned model prefers its own
    assert got.accuracy > 50 and got.margin > 0


def test_swapping_chosen_and_rejected_mirrors_the_figures(runs, tmp_path):
    moved, _, rows = runs
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    one = _measure(moved, _write(tmp_path / "a.jsonl", rows))
    other = _measure(moved, _write(tmp_path / "b.jsonl", swapped))
    assert one.accuracy + other.accuracy == pytest.approx(100)
    assert other.margin == pytest.approx(-one.margin, abs=1e-5)


def test_an_adapter_that_changes_nothing_prefers_no_pair(runs, tmp_path):
    _, still, rows = runs
    got = _measure(still, _write(tmp_path / "pairs.jsonl", rows))
    assert got.pairs == 3 and got.accuracy == 0.0  # a tie is not a preference
    assert abs(got.margin) < 1e-6 and abs(got.chosen_reward) < 1e-6


def test_every_pair_format_gives_the_same_figures(runs, tmp_path):
    """TRL's conversational and plain-text prompt/chosen/rejected, alpaca, chosen_messages
    and a multi-turn messages pair (the earlier answer is context, not scored)."""
    moved, _, rows = runs
    trl = _measure(moved, _write(tmp_path / "trl.jsonl", rows))
    question, chosen, rejected = (
        rows[0]["prompt"][0]["content"],
        rows[0]["chosen"][0]["content"],
        rows[0]["rejected"][0]["content"],
    )
    first = _measure(moved, _write(tmp_path / "one.jsonl", rows[:1]))
    forms = [
        {"prompt": question, "chosen": chosen, "rejected": rejected},
        {"instruction": question, "chosen": chosen, "rejected": rejected},
        {
            "chosen_messages": [{"role": "user", "content": question}, _turn(chosen)],
            "rejected_messages": [{"role": "user", "content": question}, _turn(rejected)],
        },
    ]
    for i, form in enumerate(forms):
        got = _measure(moved, _write(tmp_path / f"f{i}.jsonl", [form]))
        assert got.margin == pytest.approx(first.margin, abs=1e-5), form
    assert trl.pairs == 3
    history = [{"role": "user", "content": "你好"}, _turn("你好，请问有什么可以帮您？")]
    multi = {
        "messages": [*history, {"role": "user", "content": question}],
        "chosen": _turn(chosen),
        "rejected": _turn(rejected),
    }
    from qwen_mlx.eval.preference import encode_pairs, read_pairs
    from qwen_mlx.inference import open_engine

    engine = open_engine(moved, backend="torch")
    [pair], _ = encode_pairs(
        engine.tokenizer, read_pairs(_write(tmp_path / "m.jsonl", [multi])), 256
    )
    targets = [t for t, m in zip(pair.chosen.input_ids, pair.chosen.loss_mask, strict=True) if m]
    assert engine.tokenizer.decode(targets) == chosen + "<|im_end|>"


def test_the_pairs_data_pairs_writes_are_measured(runs, tmp_path):
    """``data pairs`` output, read back by ``eval --pairs`` (its pairs made without a judge)."""
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.pairs import make_pairs

    moved, _, _ = runs
    data = _write(
        tmp_path / "qa.jsonl",
        [
            {"instruction": q, "output": "凭发票按实际发生额报销，每月不超过300元。"}
            for q in QUESTIONS
        ],
    )
    out = tmp_path / "pairs.jsonl"
    settings = GenerationSettings(max_tokens=6, temperature=0.0)
    made = make_pairs(moved, data, out, settings=settings, backend="torch", console=QUIET)
    assert made.pairs == 3
    got = _measure(moved, out)
    assert got.pairs == 3 and 0 <= got.accuracy <= 100


def test_eval_reports_preference_beside_its_scores(runs, tmp_path):
    from qwen_mlx.eval.evaluate import evaluate

    moved, _, rows = runs
    pairs = _write(tmp_path / "pairs.jsonl", rows)
    test = _write(
        tmp_path / "test.jsonl", [{"instruction": q, "output": "每晚500元。"} for q in QUESTIONS]
    )
    console = Console(record=True, width=200)
    out = evaluate(
        moved, test, backend="torch", max_tokens=4, general_prompts=0, pairs=pairs, console=console
    )
    tuned = json.loads((out / "summary.json").read_text(encoding="utf-8"))["tuned"]
    assert tuned["answers"] == 3 and "rouge_l" in tuned
    expected = _measure(moved, pairs)
    assert tuned["preference"]["accuracy"] == pytest.approx(expected.accuracy)
    assert tuned["preference"]["margin"] == pytest.approx(expected.margin, abs=1e-5)
    assert tuned["preference"]["pairs"] == 3
    assert "preference accuracy (tuned):" in console.export_text()
    # a test file of pairs: its questions (with the chosen answers) and its pairs both
    out = evaluate(moved, pairs, backend="torch", max_tokens=4, general_prompts=0, console=QUIET)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))["tuned"]
    assert summary["answers"] == 3 and summary["preference"]["pairs"] == 3
    rows_out = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows_out] == [r["chosen"][0]["content"] for r in rows]


def test_a_bad_pair_file_is_one_line(runs, tmp_path):
    moved, _, rows = runs
    bad = _write(tmp_path / "bad.jsonl", [rows[0], {"instruction": "问", "output": "答"}])
    with pytest.raises(UserError, match=rf"{bad}:2: not a preference pair"):
        _measure(moved, bad)
    same = {**rows[0], "rejected": rows[0]["chosen"]}
    path = _write(tmp_path / "same.jsonl", [same])
    with pytest.raises(UserError, match=rf"{path}:1: chosen and rejected are the same"):
        _measure(moved, path)
    empty = _write(tmp_path / "empty.jsonl", [{**rows[0], "rejected": [_turn("")]}])
    with pytest.raises(UserError, match=rf"{empty}:1: .*empty text"):
        _measure(moved, empty)


def test_eval_pairs_with_a_gguf_is_refused_before_any_work(runs, tmp_path):
    from cli_helpers import one_error_line
    from click.testing import CliRunner

    from qwen_mlx.cli import cli

    moved, _, rows = runs
    pairs = _write(tmp_path / "pairs.jsonl", rows)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(
        cli, ["eval", str(moved), "--gguf", str(gguf), "--pairs", str(pairs)]
    )
    assert "--pairs needs the run's adapter" in one_error_line(result)


def test_a_dpo_run_from_an_adapter_is_measured_against_that_adapter(runs, tmp_path):
    """DPO's reference was the adapter it started from (training.from_adapter), so eval's
    π_ref is that adapter too, not the base: a DPO run that did not move from its start
    prefers nothing, where against the base it would show the start's own preferences."""
    from qwen_mlx.eval.evaluate import evaluate

    moved, _, rows = runs
    pairs = _write(tmp_path / "pairs.jsonl", rows)
    start = moved / "adapter"
    model = load_config_of(moved).model.path
    dpo = make_run(tmp_path / "dpo", Path(model), start, "training.objective=dpo",
                   f"training.from_adapter={start}")  # fmt: skip
    test = _write(tmp_path / "qa.jsonl", [{"instruction": QUESTIONS[0], "output": "凭发票报销。"}])
    out = evaluate(dpo, test, backend="torch", max_tokens=4, general_prompts=0, pairs=pairs,
                   console=QUIET)  # fmt: skip
    preference = json.loads((out / "summary.json").read_text(encoding="utf-8"))["tuned"][
        "preference"
    ]
    assert preference["reference"] == str(start)
    assert preference["accuracy"] == 0.0 and abs(preference["margin"]) < 1e-5
    against_base = _measure(moved, pairs)  # the same weights, measured against the base
    assert against_base.reference == "base" and against_base.margin > 0


def load_config_of(run: Path):
    from qwen_mlx.config_file import load_config

    return load_config(run / "config.yaml", None, [])
