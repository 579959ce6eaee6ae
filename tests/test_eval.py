"""`qwen-mlx eval`: Chinese-friendly metrics, the report, and base vs tuned."""

from __future__ import annotations

import json
import random

import pytest
from repo_helpers import BUNDLED_TEST
from rich.console import Console

from qwen_mlx.eval.text_metrics import bleu4, rouge_l, score_answers


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    assert rouge_l("报销发票", "报销发票") == pytest.approx(100)
    assert rouge_l("差旅", "会议") == 0
    # "abcd" vs "abxd": LCS "abd" = 3, precision = recall = 3/4.
    assert rouge_l("a b c d", "abxd") == pytest.approx(75)  # whitespace ignored
    assert rouge_l("", "报销") == 0


def test_bleu4_matches_nltk_method3_on_characters():
    nltk = pytest.importorskip("nltk.translate.bleu_score")
    smooth = nltk.SmoothingFunction().method3
    rng = random.Random(0)
    alphabet = "报销发票差旅住宿标准超出自理审批签字金额元"
    for _ in range(200):
        pred = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        ref = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        expected = 100 * nltk.sentence_bleu([list(ref)], list(pred), smoothing_function=smooth)
        assert bleu4(pred, ref) == pytest.approx(expected, abs=1e-9)
    assert bleu4("完全相同的一句话", "完全相同的一句话") == pytest.approx(100)


@pytest.fixture(scope="module")
def overfit_run(tiny_model_dir, tmp_path_factory):
    """A torch run trained (to overfitting) on eight held-out questions themselves."""
    pytest.importorskip("torch")
    from train_helpers import QUIET, run_config

    from qwen_mlx.config_file import save_config
    from qwen_mlx.training_run import train

    root = tmp_path_factory.mktemp("eval")
    lines = BUNDLED_TEST.read_text(encoding="utf-8").splitlines()
    rows = sorted((json.loads(x) for x in lines), key=lambda r: len(r["output"]))[:8]
    data = root / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    run = root / "run"
    run.mkdir()
    cfg = run_config(
        tiny_model_dir,
        data,
        run,
        "data.valid_ratio=0",
        "training.backend=torch",
        "training.num_epochs=15",
    )
    save_config(cfg, run / "config.yaml")
    train(cfg, run, False, QUIET)
    return run, data


def test_eval_report_base_vs_tuned(overfit_run):
    from qwen_mlx.eval.evaluate import evaluate

    run, data = overfit_run
    out = evaluate(
        run, data, compare_base=True, backend="torch", max_tokens=24, console=Console(quiet=True)
    )
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["tuned"]["test_loss"] < 0.8 * summary["base"]["test_loss"]
    assert summary["tuned"]["perplexity"] < summary["base"]["perplexity"]
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8
    # Every number is recomputable from the saved answers.
    for label in ("base", "tuned"):
        again = score_answers([(r[label], r["reference"]) for r in rows])
        assert summary[label]["rouge_l"] == pytest.approx(again["rouge_l"])
        assert summary[label]["bleu4"] == pytest.approx(again["bleu4"])
        for r in rows:
            assert r[f"{label}_rouge_l"] == pytest.approx(rouge_l(r[label], r["reference"]))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<svg" in page and rows[0]["question"] in page  # loss curve + side-by-side table
    assert "| tuned |" in (out / "report.md").read_text(encoding="utf-8")


def test_eval_on_the_exported_gguf_answers_like_the_run(overfit_run, tmp_path):
    """`eval --gguf` scores the exported file: same greedy answers as the trained run."""
    pytest.importorskip("llama_cpp")
    from qwen_mlx.eval.evaluate import evaluate
    from qwen_mlx.export.gguf import export

    run, data = overfit_run
    gguf = tmp_path / "run.gguf"
    export(run, gguf, quant="f32")  # exact: compares engines, not f16 rounding
    quiet = Console(quiet=True)
    evaluate(run, data, backend="torch", max_tokens=12, limit=4, console=quiet)
    torch_rows = (run / "eval" / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    out = evaluate(run, data, gguf=gguf, max_tokens=12, limit=4, console=quiet)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["tuned"]["test_loss"] is None and "llama.cpp" in summary["tuned"]["model"]
    gguf_rows = (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(r)["tuned"] for r in gguf_rows] == [
        json.loads(r)["tuned"] for r in torch_rows
    ]


def test_a_judge_grades_every_answer_beside_rouge_and_a_rerun_asks_nothing(overfit_run):
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    from qwen_mlx.eval.evaluate import evaluate
    from qwen_mlx.eval.judge import GRADES, JudgeSettings

    run, data = overfit_run
    with TeacherStub() as stub:
        judge = JudgeSettings(stub.url, "teacher")
        asked = []
        for _ in range(2):
            out = evaluate(
                run,
                data,
                compare_base=True,
                backend="torch",
                max_tokens=24,
                judge=judge,
                console=Console(quiet=True),
            )
            asked.append(len(stub.requests))
        # 8 questions × 2 models, then nothing more: the second run grades from the ledger
        assert asked == [16, 16]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    for label in ("base", "tuned"):
        grades = [r[f"{label}_judge"] for r in rows]
        assert rows and set(grades) <= set(GRADES)
        assert all(r[f"{label}_judge_reason"] for r in rows)
        counts = summary[label]["judge"]
        assert counts["correct"] == grades.count("correct")
        assert counts["accuracy"] == pytest.approx(100 * grades.count("correct") / len(rows))
        # each grade is the judge's verdict of that row's own answer (the stub's rule: correct
        # when the answer is a part of the reference), never another model's or question's
        for row in rows:
            answer, reference = row[label].strip(), row["reference"]
            expected = bool(answer) and (answer in reference or reference in answer)
            assert (row[f"{label}_judge"] == "correct") == expected, row
    assert "judge accuracy" in (out / "report.md").read_text(encoding="utf-8")
    assert "judge: " in (out / "report.html").read_text(encoding="utf-8")


def test_a_wrong_judge_stops_before_any_answer_is_generated(overfit_run, monkeypatch):
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    from qwen_mlx.errors import UserError
    from qwen_mlx.eval import evaluate as ev
    from qwen_mlx.eval.judge import JudgeSettings, judge_settings

    def never(*args, **kwargs):
        raise AssertionError("answers were generated before the judge was checked")

    monkeypatch.setattr(ev, "run_model", never)
    run, data = overfit_run
    with TeacherStub() as stub, pytest.raises(UserError, match="does not serve 'nope'"):
        ev.evaluate(run, data, judge=JudgeSettings(stub.url, "nope"), console=Console(quiet=True))
    with pytest.raises(UserError, match="check --judge-url and that the server is running"):
        ev.evaluate(
            run,
            data,
            judge=JudgeSettings("http://127.0.0.1:9/v1", "m"),
            console=Console(quiet=True),
        )
    with pytest.raises(UserError, match="both --judge-url URL and --judge-model"):
        judge_settings("http://127.0.0.1:1/v1", None, "OPENAI_API_KEY")


def test_the_judge_sees_the_source_passage_of_a_distilled_test_file(tmp_path):
    pytest.importorskip("openai")
    from teacher_stub import TeacherStub

    from qwen_mlx.eval.judge import JudgeSettings, grade, open_judge, passages

    chunk = {
        "id": "r.md#2",
        "source": "r.md",
        "heading": "住宿",
        "tokens": 20,
        "text": "第四条 讲师到北京出差，住宿标准为每人每晚550元。",
    }
    (tmp_path / "chunks.jsonl").write_text(json.dumps(chunk, ensure_ascii=False), "utf-8")
    record = {
        "instruction": "讲师在北京住宿能报多少？",
        "input": "",
        "output": "每晚550元。",
        "source": {"file": "r.md", "heading": "住宿", "chunk": "r.md#2"},
    }
    (tmp_path / "test.jsonl").write_text(json.dumps(record, ensure_ascii=False), "utf-8")
    found = passages(tmp_path / "test.jsonl", [f"{tmp_path / 'test.jsonl'}:1"])
    assert found == [chunk["text"]]
    with TeacherStub() as stub:
        judge = open_judge(JudgeSettings(stub.url, "teacher"), tmp_path)
        items = [
            (record["instruction"], record["output"], found[0], "每晚550元。"),
            (record["instruction"], record["output"], None, "出差住宿不能报销。"),
        ]
        verdicts = grade(judge, items, concurrency=2)
        prompts = [b["messages"][1]["content"] for _, b in stub.requests]
    assert [g for g, _ in verdicts] == ["correct", "wrong"]
    assert sum(chunk["text"] in p for p in prompts) == 1  # the passage, where it is known


def test_ctrl_c_stops_eval_within_2_s_while_the_judge_hangs(overfit_run, sigint_as_in_a_terminal):
    """Every judge request hangs (a 120 s timeout, retries): one Ctrl-C ends eval at once,
    with the verdicts kept and the one-line message (exit 130)."""
    pytest.importorskip("openai")
    from teacher_stub import ctrl_c_while_the_judge_hangs, ledger_lines

    run, data = overfit_run
    kept = len(ledger_lines(run / "eval", "judge_ledger.jsonl"))  # other tests' verdicts
    args = ["eval", str(run), "--data", str(data)]
    args += ["--backend", "torch", "--max-tokens", "4", "--limit", "4"]
    returncode, seconds, output = ctrl_c_while_the_judge_hangs(args)
    assert returncode == 130 and seconds < 2.0, (seconds, output)
    assert f"stopped: the {kept + 1} verdicts so far are kept" in output
    assert "Traceback" not in output
    assert len(ledger_lines(run / "eval", "judge_ledger.jsonl")) == kept + 1
