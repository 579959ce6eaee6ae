"""`data distill` end to end against a real loopback teacher (tests/teacher_stub.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from repo_helpers import REPO_ROOT
from teacher_stub import RULES, UNSUPPORTED_MARK, TeacherStub, default_reply, rules_file

from qwen_mlx.cli import cli
from qwen_mlx.distill.curate import jaccard, shingles
from qwen_mlx.distill.ledger import Ledger

pytest.importorskip("openai")

FILES = ("train.jsonl", "test.jsonl", "chunks.jsonl")


@pytest.fixture
def rules(tmp_path, monkeypatch):
    return rules_file(tmp_path, monkeypatch, RULES)


# Small chunks and few questions: three chunks, about fifty requests (with the default two
# paraphrases of each training question and one unanswerable question).
SETTINGS = [
    "--teacher-model",
    "teacher",
    "--questions-per-chunk",
    "3",
    "--chunk-tokens",
    "80",
    "--test-ratio",
    "0.3",
    "--set",
    "distill.followup_ratio=0",  # follow-ups have a test of their own
]


# For the tests of what happens to the questions asked for each chunk: nothing else asked.
ORIGINALS_ONLY = ("--paraphrases", "0", "--unanswerable-ratio", "0")


def distill(stub_url, doc, out, *extra, env=None):
    args = ["data", "distill", str(doc), "-o", str(out), "--teacher-url", stub_url, *SETTINGS]
    return CliRunner().invoke(cli, [*args, *extra], env=env)


def outputs(out):
    return {name: (out / name).read_text(encoding="utf-8") for name in FILES}


def rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_distill_writes_seed_format_the_same_at_any_concurrency(rules, tmp_path):
    from qwen_mlx.data import load_records

    with TeacherStub() as stub:
        one = distill(stub.url, rules, tmp_path / "c1", "--concurrency", "1")
        eight = distill(stub.url, rules, tmp_path / "c8", "--concurrency", "8")
    assert one.exit_code == 0, one.output
    assert eight.exit_code == 0, eight.output
    assert outputs(tmp_path / "c1") == outputs(tmp_path / "c8")
    train, test = rows(tmp_path / "c1" / "train.jsonl"), rows(tmp_path / "c1" / "test.jsonl")
    assert len(train) >= 6 and len(test) >= 2
    for row in train + test:
        assert set(row) == {"instruction", "input", "output", "kind", "source"}
        assert row["source"]["file"] == str(rules) and row["source"]["chunk"].startswith(str(rules))
    assert any(r["source"]["heading"].endswith("第二章 住宿费") for r in train + test)
    records, report = load_records([tmp_path / "c1" / "train.jsonl"])  # usable as data.train_file
    assert len(records) == len(train) and not report.problems
    assert train and test
    for t in test:  # no test question has a near-duplicate in training
        assert all(
            jaccard(shingles(t["instruction"]), shingles(r["instruction"])) < 0.6 for r in train
        )
    summary = json.loads((tmp_path / "c1" / "report.json").read_text(encoding="utf-8"))
    assert summary["records"] == {"train": len(train), "test": len(test)}
    assert summary["requests"]["sent"] == summary["planned_requests"]
    assert summary["requests"]["prompt_tokens"] > 0
    assert "| reason | count |" in (tmp_path / "c1" / "report.md").read_text(encoding="utf-8")


def test_a_rerun_asks_nothing_and_writes_the_same(rules, tmp_path):
    with TeacherStub() as stub:
        first = distill(stub.url, rules, tmp_path / "out")
        before = outputs(tmp_path / "out")
        asked = len(stub.requests)
        again = distill(stub.url, rules, tmp_path / "out")
        assert len(stub.requests) == asked
        systems = {b["messages"][0]["content"] for _, b in stub.requests}
    for task in ("改写", "没有覆盖", "查证员"):  # the new kinds of request were in the first run
        assert any(task in system for system in systems), task
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert outputs(tmp_path / "out") == before
    summary = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert summary["requests"]["sent"] == 0 and summary["requests"]["from_ledger"] == asked


def test_a_rerun_never_writes_over_a_hand_edit_or_into_the_documents(rules, tmp_path):
    out = tmp_path / "out"
    with TeacherStub() as stub:
        assert distill(stub.url, rules, out).exit_code == 0
        time.sleep(0.01)  # a new modification time even on coarse clocks
        edited = (out / "train.jsonl").read_text(encoding="utf-8") + '{"edited": "by hand"}\n'
        (out / "train.jsonl").write_text(edited, encoding="utf-8")
        again = distill(stub.url, rules, out)
        inside = distill(stub.url, rules, tmp_path)  # -o the folder holding rules.md
    assert again.exit_code == 1 and "train.jsonl was edited since" in again.output
    assert (out / "train.jsonl").read_text(encoding="utf-8") == edited
    assert inside.exit_code == 1 and "holds the document" in inside.output
    assert not (tmp_path / "train.jsonl").exists()


def test_faults_are_retried_and_the_result_is_unchanged(rules, tmp_path):
    with TeacherStub() as clean:
        assert distill(clean.url, rules, tmp_path / "clean", *ORIGINALS_ONLY).exit_code == 0
    with TeacherStub() as stub:
        stub.faults = ["429", "500", "drop", "garbage", "slow", "not_json"]
        stub.slow_seconds = 2.0
        result = distill(
            stub.url,
            rules,
            tmp_path / "faulty",
            "--concurrency",
            "1",
            "--set",
            "distill.timeout=0.7",
            *ORIGINALS_ONLY,
        )
        assert result.exit_code == 0, result.output
        times = [t for t, _ in stub.requests]
    assert outputs(tmp_path / "faulty") == outputs(tmp_path / "clean")
    assert times[1] - times[0] >= 1.9  # the 429's Retry-After: 2 was honoured
    nudged = [b for _, b in stub.requests if len(b["messages"]) == 4]
    assert len(nudged) == 1  # the reply that was not JSON was asked again once
    summary = json.loads((tmp_path / "faulty" / "report.json").read_text(encoding="utf-8"))
    assert summary["drops"] == {} and summary["requests"]["failed"] == 0


def test_bad_questions_and_answers_are_dropped_by_reason(rules, tmp_path):
    def scripted(body):
        text = default_reply(body)
        system = body["messages"][0]["content"]
        if "出题" in system and "第五条" in body["messages"][1]["content"]:
            questions = json.loads(text)["questions"]
            # an exact and a near repeat, within the questions_per_chunk we keep
            questions[1:1] = [questions[0], {"question": questions[0]["question"] + "呢"}]
            return json.dumps({"questions": questions}, ensure_ascii=False)
        if "出题" in system and "第三条" in body["messages"][1]["content"]:
            return "这一章没什么可问的。"  # never JSON, even when asked again
        if "审核员" in system:
            return text
        if "第一条" in body["messages"][1]["content"].split("问题：")[-1]:
            return "根据上文，" + text
        if "第二条" in body["messages"][1]["content"].split("问题：")[-1]:
            return text + UNSUPPORTED_MARK
        return text

    with TeacherStub() as stub:
        stub.reply = scripted
        result = distill(stub.url, rules, tmp_path / "out", *ORIGINALS_ONLY)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    # the exact repeat is dropped; the near one is kept, in its original's cluster
    assert summary["drops"] == {"duplicate": 1, "meta": 1, "unparseable": 1, "unsupported": 1}
    kept = rows(tmp_path / "out" / "train.jsonl") + rows(tmp_path / "out" / "test.jsonl")
    near = [r for r in kept if r["instruction"].endswith("呢")]
    assert len(near) == 1
    twins = [r for r in kept if r["instruction"] == near[0]["instruction"][:-1]]
    assert [r["source"]["cluster"] for r in twins] == [near[0]["source"]["cluster"]]
    assert not any(UNSUPPORTED_MARK in r["output"] or "根据上文" in r["output"] for r in kept)
    assert "unsupported" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_wrong_url_model_or_key_stop_in_one_line_before_any_reading(rules, tmp_path):
    missing_doc = tmp_path / "not-there.pdf"  # were documents read first, this would fail
    with TeacherStub(key="sk-right") as stub:
        wrong_model = CliRunner().invoke(
            cli,
            [
                "data",
                "distill",
                str(missing_doc),
                "-o",
                str(tmp_path / "o"),
                "--teacher-url",
                stub.url,
                "--teacher-model",
                "nope",
            ],
            env={"OPENAI_API_KEY": "sk-right"},
        )
        wrong_key = distill(stub.url, missing_doc, tmp_path / "o", env={"OPENAI_API_KEY": "x"})
        no_key = distill(stub.url, missing_doc, tmp_path / "o")
    port_closed = distill("http://127.0.0.1:9/v1", missing_doc, tmp_path / "o")
    remote = distill("https://teacher.example.com/v1", missing_doc, tmp_path / "o")
    cases = {
        "does not serve 'nope'; it serves: teacher": wrong_model,
        "rejected the API key in $OPENAI_API_KEY": wrong_key,
        "rejected the API key": no_key,  # a local teacher may go without, this one may not
        "cannot reach the teacher at http://127.0.0.1:9/v1": port_closed,
        "no API key for https://teacher.example.com/v1: set it with `export OPENAI_API_KEY": remote,
    }
    for expected, result in cases.items():
        assert result.exit_code == 1
        assert expected in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) <= 2  # one line, maybe wrapped once
    assert not (tmp_path / "o").exists()


def test_the_key_comes_from_the_named_variable_and_is_written_nowhere(rules, tmp_path):
    with TeacherStub(key="sk-very-secret") as stub:
        result = distill(
            stub.url,
            rules,
            tmp_path / "out",
            "--api-key-env",
            "MY_TEACHER_KEY",
            env={"MY_TEACHER_KEY": "sk-very-secret"},
        )
    assert result.exit_code == 0, result.output
    for path in (p for p in (tmp_path / "out").rglob("*") if p.is_file()):  # chat/ too
        assert "sk-very-secret" not in path.read_text(encoding="utf-8"), path.name


def test_plan_reads_and_chunks_but_sends_nothing(rules, tmp_path):
    (tmp_path / "config.yaml").write_text("distill:\n  questions_per_chunk: 4\n", encoding="utf-8")
    with TeacherStub() as stub:
        result = CliRunner().invoke(
            cli,
            [
                "data",
                "distill",
                str(rules),
                "-o",
                str(tmp_path / "out"),
                "--plan",
                "--chunk-tokens",
                "80",
            ],
        )
        assert stub.requests == []
    assert result.exit_code == 0, result.output
    # 3 × (1 + 2 × 4), 3 more for the 5% of 12 questions (one) that get a follow-up, 2 for
    # the one unanswerable question (10% of 12: asked for, then checked), and for the 11
    # training questions (12 less 10% held out) 11 paraphrase requests and 2 × 2 × 11 to
    # answer and check their two paraphrases: 27 + 3 + 2 + 55
    assert "3 chunks" in result.output and "87 requests" in result.output
    assert "paraphrases 11, paraphrase answers 22" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_spent_budget_stops_and_the_rerun_goes_on(rules, tmp_path):
    with TeacherStub() as stub:
        stopped = distill(stub.url, rules, tmp_path / "out", "--max-requests", "5")
        assert len(stub.answered) == 5
        done = distill(stub.url, rules, tmp_path / "out")
        assert stub.repeats() == 0
    assert stopped.exit_code == 1 and "--max-requests 5" in stopped.output
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out" / "train.jsonl").is_file()


def test_prompts_file_overrides_a_template_and_rejects_unknown_keys(rules, tmp_path):
    good = tmp_path / "prompts.yaml"
    good.write_text("zh:\n  answer:\n    system: 你是财务处的老师。\n", encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("zh:\n  anwser:\n    system: x\n", encoding="utf-8")
    with TeacherStub() as stub:
        ok = distill(stub.url, rules, tmp_path / "out", "--prompts", str(good))
        systems = {b["messages"][0]["content"] for _, b in stub.requests}
        wrong = distill(stub.url, rules, tmp_path / "out2", "--prompts", str(bad))
    assert ok.exit_code == 0, ok.output
    assert "你是财务处的老师。" in systems
    assert wrong.exit_code == 1 and "bad.yaml: expected language → task" in wrong.output


def test_a_torn_last_ledger_line_is_cut_and_the_rest_kept(tmp_path):
    path = tmp_path / "ledger.jsonl"
    good = json.dumps({"key": "a", "reply": {"content": "好"}}, ensure_ascii=False)
    path.write_text(good + "\n" + '{"key": "b", "rep', encoding="utf-8")
    ledger = Ledger(path)
    assert ledger.get("a") == {"content": "好"} and ledger.get("b") is None
    ledger.add("c", {"content": "新"})
    assert [json.loads(x)["key"] for x in path.read_text(encoding="utf-8").splitlines()] == [
        "a",
        "c",
    ]


def test_kill_9_mid_run_then_rerun_asks_nothing_twice(rules, tmp_path):
    with TeacherStub() as clean:
        assert distill(clean.url, rules, tmp_path / "clean").exit_code == 0
        total = len(clean.answered)
        kinds = {b["messages"][0]["content"][:6] for b in clean.answered}
    assert len(kinds) == 6  # questions, answers, checks, paraphrases, unanswerable, their checks
    out = tmp_path / "killed"
    with TeacherStub() as stub:
        cmd, env = _command(rules, out, stub.url), _env()
        stub.hold_after = total // 2
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _wait_for_ledger(out, total // 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _ledger_lines(out) == total // 2
        stub.hold_after = None
        stub.release.set()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert stub.repeats() == 0  # nothing the teacher answered was asked again
        assert len(stub.answered) == total
    assert outputs(out) == outputs(tmp_path / "clean")


def _command(rules, out, url, *extra):
    """``data distill`` as its own process (so it can be killed), concurrency 3."""
    return [
        sys.executable,
        "-m",
        "qwen_mlx",
        "data",
        "distill",
        str(rules),
        "-o",
        str(out),
        "--teacher-url",
        url,
        *SETTINGS,
        "--concurrency",
        "3",
        *extra,
    ]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _wait_for_ledger(out, lines):
    deadline = time.monotonic() + 60
    while _ledger_lines(out) < lines and time.monotonic() < deadline:
        time.sleep(0.05)


def _ledger_lines(out):
    path = out / "ledger.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_a_question_with_context_keeps_it_as_input(rules, tmp_path):
    def with_context(body):
        text = default_reply(body)
        if "出题" in body["messages"][0]["content"]:
            questions = json.loads(text)["questions"]
            questions[0]["input"] = "我是讲师，出差3天"
            return json.dumps({"questions": questions}, ensure_ascii=False)
        return text

    with TeacherStub() as stub:
        stub.reply = with_context
        assert distill(stub.url, rules, tmp_path / "out", *ORIGINALS_ONLY).exit_code == 0
        answer_prompts = [b["messages"][1]["content"] for _, b in stub.requests]
    kept = rows(tmp_path / "out" / "train.jsonl") + rows(tmp_path / "out" / "test.jsonl")
    assert sum(r["input"] == "我是讲师，出差3天" for r in kept) == 3  # one per chunk
    assert sum("我是讲师，出差3天" in p for p in answer_prompts) == 6  # its answer and check


def test_distill_settings_in_the_config_are_checked(rules, tmp_path):
    (tmp_path / "config.yaml").write_text("distill:\n  teacher_ur: x\n", encoding="utf-8")
    typo = CliRunner().invoke(cli, ["data", "distill", str(rules), "-o", "o", "--plan"])
    assert typo.exit_code == 1 and "did you mean 'distill.teacher_url'" in typo.output
    (tmp_path / "config.yaml").write_text("distill:\n  test_ratio: 1.5\n", encoding="utf-8")
    bad = CliRunner().invoke(cli, ["data", "distill", str(rules), "-o", "o", "--plan"])
    assert bad.exit_code == 1 and "'distill.test_ratio' is 1.5" in bad.output


def test_follow_ups_are_multi_turn_records_in_their_first_turns_split(rules, tmp_path):
    from qwen_mlx.data import load_records

    with TeacherStub() as stub:
        result = distill(stub.url, rules, tmp_path / "out", "--set", "distill.followup_ratio=1")
    assert result.exit_code == 0, result.output
    for name in ("train.jsonl", "test.jsonl"):
        split = rows(tmp_path / "out" / name)
        firsts = {
            (r["instruction"], r["output"]): r["source"]["cluster"]
            for r in split
            if r["source"]["origin"] == "question"
        }
        follows = [r for r in split if "history" in r]
        assert len(follows) == len(firsts) > 0  # every kept question got one, beside it
        # in its first turn's split and cluster
        assert all(firsts[tuple(r["history"][0])] == r["source"]["cluster"] for r in follows)
        assert all(r["instruction"].startswith("追问") for r in follows)
        records, report = load_records([tmp_path / "out" / name])
        turns = sorted(len(r.data["messages"]) for r in records)
        assert not report.problems and turns.count(4) == len(follows)  # user/assistant × 2


def test_ctrl_c_keeps_every_reply_already_sent_for(rules, tmp_path, sigint_as_in_a_terminal):
    # the questions' requests alone: each is answered 0.3 s late (the kill -9 test above
    # resumes every kind of request)
    with TeacherStub() as clean:
        assert distill(clean.url, rules, tmp_path / "clean", *ORIGINALS_ONLY).exit_code == 0
    out = tmp_path / "stopped"
    with TeacherStub(latency=0.3) as stub:
        cmd = _command(rules, out, stub.url, *ORIGINALS_ONLY)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _wait_for_ledger(out, 4)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 130, output
        assert "run the same command again" in output and "Traceback" not in output
        assert _ledger_lines(out) == len(stub.answered)  # replies in flight were waited for
        rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert stub.repeats() == 0
    assert outputs(out) == outputs(tmp_path / "clean")


def test_an_ollama_model_may_be_named_without_its_latest_tag(rules, tmp_path):
    with TeacherStub(models=("qwen2.5:latest",)) as stub:
        args = [
            "data",
            "distill",
            str(rules),
            "-o",
            str(tmp_path / "out"),
            "--teacher-url",
            stub.url,
            "--teacher-model",
            "qwen2.5",
            "--max-requests",
            "1",
        ]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "--max-requests 1" in result.output  # past the probe


def test_the_same_request_from_two_threads_is_sent_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from qwen_mlx.distill.teacher import Teacher

    with TeacherStub(latency=0.2) as stub:
        teacher = Teacher(stub.url, "teacher", "OPENAI_API_KEY", tmp_path / "ledger.jsonl")
        question = [
            {"role": "system", "content": "你是熟悉规章的人。"},
            {"role": "user", "content": "材料：\n第一条 出差须先审批。\n\n问题：要审批吗？"},
        ]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: teacher.ask(question, {}), range(4)))
    assert len(stub.answered) == 1
    assert all(r == replies[0] for r in replies)
    assert teacher.usage.sent == 1 and teacher.usage.from_ledger == 3
