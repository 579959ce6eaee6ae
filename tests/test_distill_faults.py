"""`data distill` and the judge against a teacher that hangs, misbehaves or is shared.

Ctrl-C while every request hangs, replies that are not text or far too long, two runs
into one folder, the attempt budget, the ledger's key, credentials in the URL, and a run
that keeps nothing, each against a real loopback server (tests/teacher_stub.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from teacher_stub import (
    TeacherStub,
    default_reply,
    distill_command,
    held,
    ledger_lines,
    process_env,
    rules_file,
    wait_for,
)

from qwen_mlx.cli import cli

pytest.importorskip("openai")

RULES = """# 差旅费报销细则
## 第一章 总则
第一条 为规范学校差旅费管理，根据国家有关规定，制定本细则。
第二条 本细则适用于学校全体教职工因公出差。出差人员应当先审批后出差。
## 第二章 住宿费
第三条 住宿费在标准内凭发票据实报销，超出部分自理。
第四条 讲师到北京出差，住宿标准为每人每晚550元；到上海出差，标准为每人每晚500元。
"""
QUESTION = [
    {"role": "system", "content": "你是熟悉规章的人。"},
    {"role": "user", "content": "材料：\n第一条 出差须先审批。\n\n问题：要审批吗？"},
]


@pytest.fixture
def rules(tmp_path, monkeypatch):
    return rules_file(tmp_path, monkeypatch, RULES)


def distill(url, doc, out, *extra):
    """``data distill`` in this process (two chunks, three questions each, no follow-ups)."""
    return CliRunner().invoke(cli, distill_command(doc, out, url, *extra)[3:])


def report(out):
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def records(out):
    text = "".join((out / n).read_text(encoding="utf-8") for n in ("train.jsonl", "test.jsonl"))
    return [json.loads(x) for x in text.splitlines()]


def everything_written(out):
    return "".join(p.read_text(encoding="utf-8") for p in out.iterdir() if p.is_file())


# -- Ctrl-C while the teacher hangs ------------------------------------------------------


def _start_and_hang(rules, out, stub, answered=4):
    """A distill process whose teacher answers ``answered`` requests, then hangs on every
    one (the default 120 s timeout); returns it once requests are held."""
    stub.hold_after = answered
    cmd = distill_command(rules, out, stub.url, "--concurrency", "3")
    proc = subprocess.Popen(
        cmd, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert wait_for(lambda: len(ledger_lines(out)) == answered and held(stub) > 0)
    time.sleep(0.3)  # into the hang: past any reply landing
    return cmd, proc


def _stop(proc, presses=1):
    start = time.monotonic()
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    output = proc.communicate(timeout=60)[0]
    return output, time.monotonic() - start


def test_ctrl_c_stops_within_2_s_while_the_teacher_hangs(rules, tmp_path, sigint_as_in_a_terminal):
    out = tmp_path / "out"
    with TeacherStub() as stub:
        cmd, proc = _start_and_hang(rules, out, stub)
        output, seconds = _stop(proc)
        assert proc.returncode == 130, output
        assert seconds < 2.0, f"still running {seconds:.1f} s after Ctrl-C"
        assert "stopped: the 4 replies so far" in output and "Traceback" not in output
        assert len(ledger_lines(out)) == 4  # the count told is the count kept
        stub.hold_after, held_before = None, len(stub.requests)
        stub.release.set()
        rerun = subprocess.run(cmd, env=process_env(), capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert stub.repeats() == 0 and len(stub.requests) > held_before


def test_a_second_ctrl_c_exits_too_and_says_stopped_once(rules, tmp_path, sigint_as_in_a_terminal):
    with TeacherStub() as stub:
        _, proc = _start_and_hang(rules, tmp_path / "out", stub)
        output, seconds = _stop(proc, presses=2)
    assert proc.returncode == 130 and seconds < 2.0, (seconds, output)
    assert output.count("stopped") == 1 and "Traceback" not in output


# -- replies that are not text, or far too long --------------------------------------------


def _bad_content_for_one_chunk(content):
    def reply(body):
        if "出题" in body["messages"][0]["content"] and "第三条" in body["messages"][1]["content"]:
            return content
        return default_reply(body)

    return reply


@pytest.mark.parametrize("content", [7, {"questions": []}, ["问题"], None])
def test_a_reply_whose_content_is_not_text_is_a_counted_drop(rules, tmp_path, content):
    out = tmp_path / "out"
    with TeacherStub() as stub:
        stub.reply = _bad_content_for_one_chunk(content)
        bad = distill(stub.url, rules, out)
        assert bad.exit_code == 0, bad.output
        assert report(out)["drops"] == {"bad_reply": 1}
        assert "bad_reply" in (out / "report.md").read_text(encoding="utf-8")
        lines = ledger_lines(out)
        assert lines and all(isinstance(x["reply"]["content"], str) for x in lines)
        stub.reply = default_reply  # the same teacher, now good: the rerun is not poisoned
        good = distill(stub.url, rules, out)
    assert good.exit_code == 0, good.output
    assert report(out)["drops"] == {} and len(records(out)) == 6


def test_an_answer_far_beyond_max_tokens_is_dropped_never_recorded(rules, tmp_path):
    flood = "超" * 13_000  # the answer task asks for 800 tokens: 12,800 characters at most

    def reply(body):
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        answering = "出题" not in system and "审核员" not in system
        return flood if answering and "第三条" in user.split("问题：")[-1] else default_reply(body)

    with TeacherStub() as stub:
        stub.reply = reply
        result = distill(stub.url, rules, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert report(tmp_path / "out")["drops"] == {"oversized": 1}
    assert flood not in everything_written(tmp_path / "out")
    assert len(records(tmp_path / "out")) == 5


@pytest.mark.parametrize("fault", ["huge", "huge_declared"])
def test_a_huge_body_is_cut_off_not_read_whole(tmp_path, fault):
    from qwen_mlx.distill.teacher import Teacher

    with TeacherStub() as stub:
        teacher = Teacher(stub.url, "teacher", "OPENAI_API_KEY", tmp_path / "ledger.jsonl")
        stub.faults = [fault]
        start = time.monotonic()
        reply, why = teacher.request(QUESTION, {"max_tokens": 100})
        seconds = time.monotonic() - start
        posts = len(stub.requests)
    assert (reply, why) == (None, "oversized")
    assert seconds < 2.0 and posts == 1  # dropped at once, not retried
    assert not (tmp_path / "ledger.jsonl").exists()


def test_a_judges_reason_is_cut_and_a_flood_is_a_failed_grade(tmp_path):
    from qwen_mlx.eval.judge import REASON_CHARS, JudgeSettings, grade, open_judge

    reasons = {"长": "理由" * 500, "洪": "理由" * 500_000}  # 1,000 and 1M characters

    def reply(body):
        question = body["messages"][1]["content"].split("\n", 1)[0]
        verdict = {"grade": "correct", "reason": reasons[question[-1]]}
        return json.dumps(verdict, ensure_ascii=False)

    with TeacherStub() as stub:
        stub.reply = reply
        judge = open_judge(JudgeSettings(stub.url, "teacher"), tmp_path)
        items = [("报销要审批吗长", "要", None, "要"), ("报销要审批吗洪", "要", None, "要")]
        (long_grade, long_reason), (flood_grade, flood_reason) = grade(judge, items, 2)
    assert long_grade == "correct" and len(long_reason) == REASON_CHARS
    assert (flood_grade, flood_reason) == ("failed", "oversized")
    assert (tmp_path / "judge_ledger.jsonl").stat().st_size < 10_000


# -- one run per folder -------------------------------------------------------------------


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(rules, tmp_path):
    out = tmp_path / "out"
    with TeacherStub() as stub:
        cmd, first = _start_and_hang(rules, out, stub)
        before = len(stub.requests)
        second = distill(stub.url, rules, out)
        asked = len(stub.requests) - before
        first.kill()  # kill -9: the lock goes with the process
        first.communicate()
        stub.hold_after = None
        stub.release.set()
        third = subprocess.run(cmd, env=process_env(), capture_output=True, text=True, timeout=60)
    assert second.exit_code == 1, second.output
    assert f"in use by another `data distill` (PID {first.pid})" in second.output
    assert second.output.strip().splitlines()[-1].startswith("Error:") and asked == 0
    assert third.returncode == 0, third.stdout + third.stderr  # no stale lock


# -- accounting, the ledger's key, credentials, an empty result ----------------------------


def test_the_budget_counts_http_attempts_and_the_report_says_both(rules, tmp_path):
    with TeacherStub() as stub:
        stub.faults = ["500", "500", "500"]
        spent = distill(stub.url, rules, tmp_path / "spent", "--max-requests", "2")
        assert spent.exit_code == 1 and "--max-requests 2" in spent.output
        assert len(stub.requests) == 2  # one request, retried once: two attempts
        stub.faults = ["500", "500"]
        done = distill(stub.url, rules, tmp_path / "done", "--concurrency", "1")
    assert done.exit_code == 0, done.output
    req = report(tmp_path / "done")["requests"]
    assert req["attempts"] == req["sent"] + 2 and req["sent"] > 0
    said = " ".join(done.output.split())
    assert f"{req['sent']} requests sent in {req['attempts']} HTTP attempts" in said
    assert "HTTP attempts" in (tmp_path / "done" / "report.md").read_text(encoding="utf-8")


def test_another_teacher_or_model_is_never_answered_from_the_ledger(rules, tmp_path):
    out = tmp_path / "out"
    with TeacherStub(models=("teacher", "other")) as first:
        assert distill(first.url, rules, out).exit_code == 0
        asked = len(first.requests)
        other_model = distill(first.url, rules, out, "--teacher-model", "other")
        assert other_model.exit_code == 0 and len(first.requests) == 2 * asked
    with TeacherStub() as second:  # another endpoint, the same model name
        assert distill(second.url, rules, out).exit_code == 0
        assert len(second.requests) == asked
    assert report(out)["requests"]["from_ledger"] == 0


def test_a_judge_is_keyed_by_its_endpoint_and_model(tmp_path):
    from qwen_mlx.eval.judge import JudgeSettings, grade, open_judge

    items = [("报销要审批吗？", "要", None, "要")]
    with TeacherStub(models=("a", "b")) as one, TeacherStub(models=("a",)) as two:
        for url, model in ((one.url, "a"), (one.url, "b"), (two.url, "a"), (one.url, "a")):
            grade(open_judge(JudgeSettings(url, model), tmp_path), items, 1)
        asked = [b["model"] for _, b in one.requests], [b["model"] for _, b in two.requests]
    assert asked == (["a", "b"], ["a"])  # the last is graded from the ledger


def test_credentials_in_the_teacher_url_are_written_and_printed_nowhere(rules, tmp_path):
    with TeacherStub() as stub:
        url = stub.url.replace("://", "://alice:pw-s3cret@")
        result = distill(url, rules, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "pw-s3cret" not in result.output + everything_written(tmp_path / "out")
    assert report(tmp_path / "out")["teacher"]["url"] == stub.url


def test_public_url_drops_user_info_and_masks_key_like_parameters():
    from qwen_mlx.distill.transport import public_url

    assert public_url("https://u:p@api.example.com:8443/v1?api-key=sk-1&region=eu&token=t") == (
        "https://api.example.com:8443/v1?api-key=***&region=eu&token=***"
    )
    assert public_url("http://localhost:11434/v1") == "http://localhost:11434/v1"


def test_a_run_that_keeps_nothing_exits_1_saying_what_dropped_everything(rules, tmp_path):
    def nothing_supported(body):
        if "审核员" in body["messages"][0]["content"]:
            return json.dumps({"supported": False, "reason": "材料没有"}, ensure_ascii=False)
        return default_reply(body)

    with TeacherStub() as stub:
        stub.reply = nothing_supported
        result = distill(stub.url, rules, tmp_path / "out")
    assert result.exit_code == 1
    assert "0 records from 2 chunks: every question was dropped (unsupported 6)" in result.output
    assert "Traceback" not in result.output and (tmp_path / "out" / "report.md").is_file()


def test_a_judge_that_cannot_be_reached_is_called_the_judge(tmp_path):
    from qwen_mlx.errors import UserError
    from qwen_mlx.eval.judge import JudgeSettings, open_judge

    with pytest.raises(UserError, match=r"cannot reach the judge at http://127\.0\.0\.1:9/v1"):
        open_judge(JudgeSettings("http://127.0.0.1:9/v1", "m"), tmp_path)
