"""``data pairs``: preference pairs from the tuned model's own wrong answers.

Users rely on: an answer the judge grades wrong or partly right (or, without a judge, one
whose ROUGE-L is below the threshold) becoming a pair (reference = chosen, the model's answer
= rejected); an invented answer to an unanswerable question becoming a pair with the
reference refusal; a right answer (or a refusal) making none; the counts by reason; judge
faults leaving no pair and being asked again on a rerun; Ctrl-C keeping what was done; the
output never partial and never written over a user's file; the records reading as pair data.
The model is the tiny random one with a random adapter: its answers are real greedy answers
(never a fake), and the references are chosen around them; these prove the sorting and the
records, never answer quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import one_error_line
from click.testing import CliRunner
from lora_helpers import make_peft_adapter, make_run
from rich.console import Console

from qwen_mlx.cli import cli
from qwen_mlx.eval.refusals import is_refusal
from qwen_mlx.pairs import (
    CORRECT,
    EMPTY,
    INVENTED,
    JUDGED_PARTLY,
    JUDGED_WRONG,
    LOW_ROUGE_L,
    NO_VERDICT,
    REFUSED,
    classify,
)

QUIET = Console(quiet=True)
MAX_TOKENS = 8
QUESTIONS = [
    "出差住宿标准是多少？",
    "市内交通费怎么报销？",
    "会议费的上限是多少？",
    "买宠物粮能报销吗？",
]
REFUSAL = "细则未规定此类费用，请咨询财务处。"


# ---------------------------------------------------------------- the sorting rule


@pytest.mark.parametrize(
    ("kind", "reference", "answer", "grade", "reason"),
    [
        # without a judge: ROUGE-L (characters) against the threshold 0.4
        (None, "每晚不超过500元。", "每晚不超过500元。", None, CORRECT),
        ("answerable", "每晚不超过500元。", "住宿每晚不超过500元", None, CORRECT),
        (None, "每晚不超过500元。", "按实际发生额报销。", None, LOW_ROUGE_L),
        (None, "每晚不超过500元。", "   ", None, EMPTY),
        # with a judge: its grade decides, whatever ROUGE-L says
        (None, "每晚不超过500元。", "每晚不超过800元。", "wrong", JUDGED_WRONG),
        (None, "每晚不超过500元，凭发票报销。", "每晚不超过500元。", "partly", JUDGED_PARTLY),
        (None, "每晚不超过500元。", "一晚最多五百块钱。", "correct", CORRECT),
        (None, "每晚不超过500元。", "每晚不超过800元。", "failed", NO_VERDICT),
        # unanswerable: a refusal is right, an answer is invented
        ("unanswerable", REFUSAL, "本细则没有涉及该情况。", None, REFUSED),
        ("unanswerable", REFUSAL, "可以报销，每次不超过200元。", None, INVENTED),
        ("unanswerable", REFUSAL, "细则未规定，但一般可报200元。", None, INVENTED),  # an amount
        ("unanswerable", REFUSAL, "这个不归我们管。", "correct", REFUSED),  # the judge's word
        ("unanswerable", REFUSAL, "本细则没有涉及该情况。", "wrong", INVENTED),
        ("unanswerable", REFUSAL, REFUSAL, "wrong", REFUSED),  # chosen would equal rejected
    ],
)
def test_an_answer_is_sorted_by_the_judge_or_rouge_l_or_as_a_refusal(
    kind, reference, answer, grade, reason
):
    assert classify(kind, reference, answer, grade, 0.4) == reason


def test_the_threshold_is_the_rouge_l_fraction():
    from qwen_mlx.eval.text_metrics import rouge_l

    reference, answer = "每晚不超过500元。", "每晚最多报500块"
    score = rouge_l(answer, reference) / 100
    assert 0.3 < score < 0.7
    assert classify(None, reference, answer, None, score) == CORRECT
    assert classify(None, reference, answer, None, score + 0.01) == LOW_ROUGE_L


# ---------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A run of the tiny model with a random adapter, and its greedy answers to QUESTIONS
    (through eval's batched path, as ``data pairs`` must get them too)."""
    pytest.importorskip("peft")
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.inference import answer_all, open_engine
    from qwen_mlx.reasoning import split_reply

    root = tmp_path_factory.mktemp("pairs")
    adapter = make_peft_adapter(tiny_model_dir, root / "adapter", b_std=0.01)
    run_dir = make_run(root / "run", tiny_model_dir, adapter)
    engine = open_engine(run_dir, backend="torch")
    settings = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0)
    asked = [[{"role": "user", "content": q}] for q in QUESTIONS]
    answers = [""] * len(QUESTIONS)
    for i, reply in answer_all(engine, asked, settings, batch_size=1):
        answers[i] = split_reply(reply.text, engine.family.think_tags)[1].strip()
    assert all(answers) and len(set(answers)) > 1  # real, different answers to work with
    assert not is_refusal(answers[3])  # the random model does not refuse
    return run_dir, answers


def _data(path: Path, answers: list[str]) -> Path:
    """Q0's reference is the model's own answer (right), Q1's and Q2's are not (wrong), Q3
    is unanswerable (its reference a refusal)."""
    rows = [
        {"instruction": QUESTIONS[0], "output": answers[0], "kind": "answerable"},
        {"instruction": QUESTIONS[1], "output": "凭发票按实际发生额报销，每月不超过300元。"},
        {"instruction": QUESTIONS[2], "output": "每次会议不超过五千元，须事先审批。"},
        {"instruction": QUESTIONS[3], "output": REFUSAL, "kind": "unanswerable"},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _counts(output: str) -> dict[str, int]:
    """The answers by reason that ``data pairs`` printed."""
    lines = output.split("answers by reason:\n", 1)[1].splitlines()
    counts = {}
    for line in lines:
        number, _, label = line.strip().partition("  ")
        if not number.isdigit():
            break
        counts[label.strip()] = int(number)
    return counts


def _pairs(*args) -> object:
    base = ["data", "pairs", "--backend", "torch", "--max-tokens", str(MAX_TOKENS)]
    return CliRunner().invoke(cli, [*base, *map(str, args)])


def test_without_a_judge_low_rouge_l_answers_and_invented_ones_make_pairs(run, tmp_path):
    from qwen_mlx.data_prefs import preference_kind

    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    result = _pairs(run_dir, "--data", data, "-o", out)
    assert result.exit_code == 0, result.output
    pairs = _lines(out)
    assert [p["reason"] for p in pairs] == [LOW_ROUGE_L, LOW_ROUGE_L, INVENTED]
    for pair, i in zip(pairs, (1, 2, 3), strict=True):
        assert preference_kind(pair) == "pair"
        assert pair["prompt"] == [{"role": "user", "content": QUESTIONS[i]}]
        assert pair["rejected"] == [{"role": "assistant", "content": answers[i]}]
        assert pair["source"]["record"] == f"{data}:{i + 1}"
        assert pair["source"]["model"] == run_dir.name
    assert pairs[0]["chosen"][0]["content"].startswith("凭发票")
    assert pairs[0]["kind"] == "answerable" and pairs[0]["source"]["rouge_l"] < 0.4
    assert pairs[2]["kind"] == "unanswerable" and pairs[2]["chosen"][0]["content"] == REFUSAL
    assert _counts(result.output) == {
        "ROUGE-L below the threshold → pairs": 2,
        "invented answer to an unanswerable question → pairs": 1,
        "kept as correct (no pair)": 1,
    }
    text = " ".join(result.output.split())
    assert "wrote 3 preference pairs from 4 questions" in text
    # the random model never ends its turn: every rejected answer is cut off, and says so
    assert all(p["source"]["cut_off"] for p in pairs)
    assert "3 rejected answers reached --max-tokens 8 and are kept cut off" in text
    assert not (tmp_path / "pairs.jsonl.partial").exists()  # done: only the output is left


def test_a_zero_threshold_keeps_every_answerable_answer(run, tmp_path):
    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    result = _pairs(run_dir, "--data", data, "-o", out, "--threshold", "0")
    assert result.exit_code == 0, result.output
    assert [p["reason"] for p in _lines(out)] == [INVENTED]


def test_the_system_prompt_of_the_run_is_in_every_prompt(run, tmp_path, tiny_model_dir):
    run_dir, answers = run
    system = "你是报销助手。"
    other = make_run(
        tmp_path / "run2", tiny_model_dir, run_dir / "adapter", f"data.system_prompt={system}"
    )
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    result = _pairs(other, "--data", data, "-o", out, "--threshold", "0")
    assert result.exit_code == 0, result.output
    prompt = _lines(out)[0]["prompt"]
    assert prompt == [
        {"role": "system", "content": system},
        {"role": "user", "content": QUESTIONS[3]},
    ]


# ---------------------------------------------------------------- with a judge


def _scripted(grades: dict[str, str], bad: dict[str, int] | None = None, bad_reply=""):
    """A judge reply per question (``grades``); first ``bad[q]`` replies ``bad_reply`` (text
    that is not JSON, or None: a completion without text) to question q."""
    from teacher_stub import default_reply

    bad = dict(bad or {})

    def reply(body: dict) -> str:
        for question, grade in grades.items():
            if f"问题：{question}\n" in body["messages"][1]["content"]:
                if bad.get(question):
                    bad[question] -= 1
                    return bad_reply
                return json.dumps({"grade": grade, "reason": f"判为{grade}"}, ensure_ascii=False)
        return default_reply(body)

    return reply


def test_with_a_judge_its_wrong_and_partly_grades_make_pairs_and_a_rerun_asks_nothing(
    run, tmp_path
):
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    grades = dict(zip(QUESTIONS, ["correct", "wrong", "partly", "wrong"], strict=True))
    with TeacherStub() as stub:
        stub.reply = _scripted(grades)
        judge = ["--judge-url", stub.url, "--judge-model", "teacher"]
        result = _pairs(run_dir, "--data", data, "-o", out, *judge)
        assert result.exit_code == 0, result.output
        asked = len(stub.requests)
        assert asked == len(QUESTIONS)
        again = _pairs(run_dir, "--data", data, "-o", out, *judge)
        assert again.exit_code == 0, again.output
        assert len(stub.requests) == asked  # every verdict came from the ledger
    pairs = _lines(out)
    assert [p["reason"] for p in pairs] == [JUDGED_WRONG, JUDGED_PARTLY, INVENTED]
    assert [p["source"]["judge"] for p in pairs] == ["wrong", "partly", "wrong"]
    assert pairs[0]["source"]["judge_reason"] == "判为wrong"
    assert (tmp_path / "pairs.judge_ledger.jsonl").is_file()
    assert _counts(result.output) == {
        "wrong per the judge → pairs": 1,
        "partly right per the judge → pairs": 1,
        "invented answer to an unanswerable question → pairs": 1,
        "kept as correct (no pair)": 1,
    }


def test_a_reply_without_a_grade_is_no_verdict_and_no_pair(run, tmp_path):
    """A reply that is not JSON, and again after the nudge: that answer has no verdict, so no
    pair, and the command says so."""
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    grades = dict(zip(QUESTIONS, ["correct", "wrong", "wrong", "wrong"], strict=True))
    with TeacherStub() as stub:
        stub.reply = _scripted(grades, bad={QUESTIONS[1]: 2}, bad_reply="好的，我来评一下。")
        judge = ["--judge-url", stub.url, "--judge-model", "teacher"]
        result = _pairs(run_dir, "--data", data, "-o", out, *judge)
    assert result.exit_code == 0, result.output
    assert [p["reason"] for p in _lines(out)] == [JUDGED_WRONG, INVENTED]
    assert _counts(result.output)["no verdict from the judge (no pair)"] == 1
    assert "1 answers got no verdict from the judge" in " ".join(result.output.split())


def _judged(run_dir, data, out, judge) -> object:
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.pairs import make_pairs

    return make_pairs(
        run_dir,
        data,
        out,
        judge=judge,
        settings=GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0),
        backend="torch",
        console=QUIET,
    )


def test_a_failed_judge_request_is_no_pair_and_asked_again_on_a_rerun(run, tmp_path):
    """Two completions without text (asked again once, then dropped): no verdict for that
    answer; the rerun asks it again, and nothing else (the ledger has the rest)."""
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    from qwen_mlx.eval.judge import JudgeSettings

    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    grades = dict(zip(QUESTIONS, ["correct", "wrong", "correct", "wrong"], strict=True))
    with TeacherStub() as stub:
        stub.reply = _scripted(grades, bad={QUESTIONS[1]: 2}, bad_reply=None)
        judge = JudgeSettings(stub.url, "teacher")
        first = _judged(run_dir, data, out, judge)
        assert first.counts == {CORRECT: 2, NO_VERDICT: 1, INVENTED: 1}
        answered = len(stub.answered)
        second = _judged(run_dir, data, out, judge)
        assert len(stub.answered) == answered + 1
    assert second.counts == {CORRECT: 2, JUDGED_WRONG: 1, INVENTED: 1}
    assert [p["reason"] for p in _lines(out)] == [JUDGED_WRONG, INVENTED]
    said = [[n for n in r.notes if "no verdict" in n] for r in (first, second)]
    assert len(said[0]) == 1 and not said[1]


def test_a_judge_that_times_out_or_drops_the_connection_is_retried(run, tmp_path):
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    from qwen_mlx.eval.judge import JudgeSettings

    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    grades = dict(zip(QUESTIONS, ["correct", "wrong", "wrong", "wrong"], strict=True))
    with TeacherStub() as stub:
        stub.reply = _scripted(grades)
        stub.faults = ["slow", "drop", "500"]
        stub.slow_seconds = 2.0
        judge = JudgeSettings(stub.url, "teacher", concurrency=1, timeout=0.5)
        result = _judged(run_dir, data, out, judge)
    assert result.counts == {CORRECT: 1, JUDGED_WRONG: 2, INVENTED: 1}
    assert result.pairs == 3 and len(_lines(out)) == 3


def test_a_wrong_judge_stops_before_any_answer(run, tmp_path, monkeypatch):
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    run_dir, answers = run

    def no_engine(*args, **kwargs):
        raise AssertionError("the model answered before the judge was checked")

    monkeypatch.setattr("qwen_mlx.inference.open_engine", no_engine)
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    with TeacherStub() as stub:
        result = _pairs(
            run_dir, "--data", data, "-o", out, "--judge-url", stub.url, "--judge-model", "nope"
        )
    assert "does not serve 'nope'" in one_error_line(result)
    result = _pairs(run_dir, "--data", data, "-o", out, "--judge-model", "m")
    assert "both --judge-url URL and --judge-model" in one_error_line(result)
    assert not out.exists()


# ---------------------------------------------------------------- stops and outputs


class _StopAfter:
    """The real engine, with Ctrl-C arriving when it is asked its ``n``-th question."""

    def __init__(self, engine, n: int):
        self.engine, self.n, self.asked = engine, n, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def prompt_ids(self, messages, max_tokens):
        self.asked += 1
        if self.asked == self.n:
            raise KeyboardInterrupt
        return self.engine.prompt_ids(messages, max_tokens)


def test_ctrl_c_keeps_the_answers_and_the_rerun_goes_on(run, tmp_path, monkeypatch):
    from qwen_mlx import inference

    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    real, engines = inference.open_engine, []

    def stopping(*args, **kwargs):
        engines.append(_StopAfter(real(*args, **kwargs), 3 if not engines else 0))
        return engines[-1]

    monkeypatch.setattr("qwen_mlx.inference.open_engine", stopping)
    first = _pairs(run_dir, "--data", data, "-o", out, "--batch-size", "1")
    assert first.exit_code == 130, first.output
    assert "the answers so far are kept" in one_error_line(first)
    assert not out.exists()  # never a partial output
    kept = (tmp_path / "pairs.jsonl.partial").read_text(encoding="utf-8").splitlines()
    assert len(kept) == 2
    second = _pairs(run_dir, "--data", data, "-o", out, "--batch-size", "1")
    assert second.exit_code == 0, second.output
    assert engines[1].asked == 2  # only the two questions left
    assert "(2 answers from an earlier run)" in " ".join(second.output.split())
    pairs = _lines(out)
    assert [p["rejected"][0]["content"] for p in pairs] == answers[1:]


def test_answers_of_an_adapter_retrained_since_are_not_reused(
    run, tmp_path, monkeypatch, tiny_model_dir
):
    import os

    from qwen_mlx import inference

    run_dir, answers = run
    own = make_run(tmp_path / "run", tiny_model_dir, run_dir / "adapter")
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    real, engines = inference.open_engine, []

    def stopping(*args, **kwargs):
        engines.append(_StopAfter(real(*args, **kwargs), 3 if not engines else 0))
        return engines[-1]

    monkeypatch.setattr("qwen_mlx.inference.open_engine", stopping)
    assert _pairs(own, "--data", data, "-o", out, "--batch-size", "1").exit_code == 130
    weights = next((own / "adapter").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    again = _pairs(own, "--data", data, "-o", out, "--batch-size", "1")
    assert again.exit_code == 0, again.output
    assert engines[1].asked == len(QUESTIONS) and "earlier run" not in again.output


def test_a_users_file_an_input_or_a_run_is_never_written_over(run, tmp_path):
    run_dir, answers = run
    data = _data(tmp_path / "qa.jsonl", answers)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my notes\n", encoding="utf-8")
    result = _pairs(run_dir, "--data", data, "-o", mine)
    assert "was not written by qwen-mlx data pairs" in one_error_line(result)
    assert mine.read_text(encoding="utf-8") == "my notes\n"
    result = _pairs(run_dir, "--data", data, "-o", data)
    assert "is this command's input" in one_error_line(result)
    result = _pairs(run_dir, "--data", data, "-o", run_dir / "adapter" / "pairs.jsonl")
    assert "part of the training run" in one_error_line(result)
    # its own earlier output is replaced; the same output edited since is not
    out = tmp_path / "pairs.jsonl"
    assert _pairs(run_dir, "--data", data, "-o", out).exit_code == 0
    assert _pairs(run_dir, "--data", data, "-o", out).exit_code == 0
    out.write_text(out.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    result = _pairs(run_dir, "--data", data, "-o", out)
    assert "was edited since" in one_error_line(result)


def test_a_file_without_questions_is_one_line(run, tmp_path):
    run_dir, _ = run
    data = tmp_path / "notes.txt"
    data.write_text("只是一段文字。\n", encoding="utf-8")
    result = _pairs(run_dir, "--data", data, "-o", tmp_path / "pairs.jsonl")
    assert "no question/answer records" in one_error_line(result)


def test_ctrl_c_stops_within_2_s_while_the_judge_hangs(run, tmp_path, sigint_as_in_a_terminal):
    """One verdict, then every judge request hangs: one Ctrl-C ends the command at once with
    the one-line message (exit 130), the verdict kept in the ledger, no output written."""
    pytest.importorskip("openai")
    from teacher_stub import ctrl_c_while_the_judge_hangs, ledger_lines

    run_dir, answers = run
    data, out = _data(tmp_path / "qa.jsonl", answers), tmp_path / "pairs.jsonl"
    args = ["data", "pairs", str(run_dir), "--data", str(data), "-o", str(out)]
    args += ["--backend", "torch", "--max-tokens", str(MAX_TOKENS)]
    returncode, seconds, output = ctrl_c_while_the_judge_hangs(args)
    assert returncode == 130 and seconds < 2.0, (seconds, output)
    assert "stopped: the 1 verdicts so far are kept" in output and "Traceback" not in output
    assert len(ledger_lines(tmp_path, "pairs.judge_ledger.jsonl")) == 1
    assert not out.exists()
    assert len((tmp_path / "pairs.jsonl.partial").read_text(encoding="utf-8").splitlines()) == 4
