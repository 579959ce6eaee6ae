"""`qwen-mlx review` on a data set, without a browser: the ledger (fsync, torn lines, kill -9,
one server per ledger), the reviewed files, the record formats, the server's guards and
the command line."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

pytest.importorskip("fastapi")

from click.testing import CliRunner
from review_helpers import distilled, review_process, rows, serving
from serve_helpers import http

from qwen_mlx.cli import cli
from qwen_mlx.data import load_records
from qwen_mlx.errors import UserError
from qwen_mlx.review.ledger import Conflict, Ledger
from qwen_mlx.review.reviewed import Review


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return distilled(tmp_path)


def post(url: str, body: dict, headers: dict | None = None):
    return http("POST", url, json.dumps(body).encode(), headers=headers)


def decide(url: str, key: str, action: str, version: int = 0, **extra):
    body = {"id": key, "action": action, "base_version": version, "reviewer": "王", **extra}
    return post(f"{url}/api/decide", body)


# ------------------------------------------------------------------ the ledger


def test_kill_9_between_decisions_loses_no_confirmed_decision(data):
    first = Review(data)
    ids = [item.id for item in first.data.items]
    first.ledger.close()
    confirmed: list[tuple[str, str]] = []
    half, go = threading.Event(), threading.Event()
    with review_process(data, "--reviewer", "张三") as (process, url):

        def decide_all():
            for i, key in enumerate(ids):
                if i == len(ids) // 2:
                    half.set()
                    go.wait(30)  # the server is killed here, between two decisions
                try:
                    reply = decide(url, key, "reject" if i % 3 == 0 else "accept")
                except OSError:
                    return  # the server is gone
                assert reply.status_code == 200, reply.text
                confirmed.append((key, "reject" if i % 3 == 0 else "accept"))

        worker = threading.Thread(target=decide_all)
        worker.start()
        assert half.wait(60)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        go.set()
        worker.join(timeout=60)
    assert len(confirmed) == len(ids) // 2
    on_disk = [(e["id"], e["action"]) for e in rows(data / "review-ledger.jsonl")]
    assert on_disk == confirmed  # every confirmed decision, in order, and nothing else
    again = Review(data)  # a restart rebuilds the reviewed set from the ledger
    rejected = {key for key, action in on_disk if action == "reject"}
    kept = rows(data / "reviewed" / "train.jsonl") + rows(data / "reviewed" / "test.jsonl")
    assert len(kept) == len(ids) - len(rejected) and rejected
    assert again.counts()["reviewed"] == len(on_disk)
    again.ledger.close()


def test_a_torn_last_line_is_cut_and_a_hand_edited_one_named(tmp_path):
    path = tmp_path / "review-ledger.jsonl"
    ledger = Ledger(path)
    ledger.add("a", 0, "甲", action="accept")
    ledger.close()
    with open(path, "ab") as fh:
        fh.write(b'{"seq": 2, "id": "b", "vers')  # the server died while writing
    ledger = Ledger(path)
    assert [e["id"] for e in ledger.entries] == ["a"]
    ledger.add("b", 0, "甲", action="reject")
    ledger.close()
    assert [e["id"] for e in rows(path)] == ["a", "b"]
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text(f"{lines[0]}\nnot json\n{lines[1]}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"review-ledger.jsonl:2: not a review decision"):
        Ledger(path)


def test_the_second_decision_on_a_version_is_a_conflict(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    first = ledger.add("r1", 0, "甲", action="edit", fields={"answer": "x"})
    with pytest.raises(Conflict) as caught:
        ledger.add("r1", 0, "乙", action="edit", fields={"answer": "y"})
    assert caught.value.current == first
    assert ledger.add("r1", 1, "乙", action="accept")["version"] == 2
    ledger.close()


def test_one_server_per_ledger(data):
    first = Review(data)
    with pytest.raises(UserError, match="in use by another `qwen-mlx review`"):
        Review(data)
    first.ledger.close()
    Review(data).ledger.close()  # free again once the first has closed


# ------------------------------------------------------------------ the reviewed files


def test_reviewed_files_are_ours_and_read_like_any_data(data):
    review = Review(data)
    items = review.data.items
    review.decide(items[0].id, "edit", 0, "甲", {"answer": "新的答案"})
    review.decide(items[1].id, "reject", 0, "甲")
    review.ledger.close()
    reviewed = data / "reviewed" / "train.jsonl"
    records, report = load_records([reviewed])  # what `train` and `data stats` read
    assert report.problems == [] and len(records) == len(rows(data / "train.jsonl")) - 1
    assert records[0].data["messages"][-1]["content"] == "新的答案"
    result = CliRunner().invoke(cli, ["data", "stats", str(reviewed), "--json"])
    assert result.exit_code == 0, result.output

    only = Review(data, only_reviewed=True)  # the same decisions, unreviewed ones left out
    assert [r["output"] for r in rows(reviewed)] == ["新的答案"]
    only.ledger.close()

    reviewed.write_text("hand edit\n", encoding="utf-8")  # never written over
    with pytest.raises(UserError, match="was edited since"):
        Review(data)


def test_decisions_on_records_no_longer_in_the_data_are_stale(data):
    review = Review(data)
    review.decide(review.data.items[0].id, "reject", 0, "甲")
    review.ledger.close()
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    again = Review(data)
    assert again.counts()["stale_decisions"] == 1 and again.counts()["reviewed"] == 0
    again.ledger.close()


FORMATS = [
    (
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        lambda r: r["messages"][-1]["content"],
        [{"role": "system", "content": "s"}],
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "q0"},
                {"from": "gpt", "value": "a0"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        lambda r: r["conversations"][-1]["value"],
        [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}],
    ),
    ({"prompt": "q", "completion": "a"}, lambda r: r["completion"], []),
    ({"instruction": "q", "output": "a"}, lambda r: r["output"], []),
]


@pytest.mark.parametrize(("record", "answer_of", "context"), FORMATS)
def test_an_edit_is_written_back_in_the_records_own_format(tmp_path, record, answer_of, context):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    review = Review(path)
    [item] = review.data.items
    assert item.fields()["question"] == "q" and item.context == context
    review.decide(item.id, "edit", 0, "甲", {"question": "新问题", "answer": "新答案"})
    review.ledger.close()
    [out] = rows(tmp_path / "reviewed" / "qa.jsonl")
    assert answer_of(out) == "新答案"
    [loaded], _ = load_records([tmp_path / "reviewed" / "qa.jsonl"])
    assert [m["content"] for m in loaded.data["messages"][-2:]] == ["新问题", "新答案"]


# ------------------------------------------------------------------ the server


def test_the_server_checks_every_decision(data):
    review = Review(data)
    key = review.data.items[0].id
    with serving(review) as url:
        cases = [
            ({"action": "delete"}, 400, "action"),
            ({"action": "edit", "fields": {"answer": ""}}, 400, "fields.answer: empty"),
            ({"action": "edit", "fields": {"notes": "x"}}, 400, "no such field"),
            ({"action": "edit", "fields": {"answer": "长" * 20_001}}, 400, "longer than"),
            ({"action": "accept", "reviewer": ""}, 400, "reviewer"),
            ({"action": "accept", "reviewer": "a\x00b"}, 400, "control"),
        ]
        for extra, status, says in cases:
            reply = decide(url, key, **{"action": "accept", **extra})
            assert reply.status_code == status and says in reply.json()["error"]["message"]
        body = {"id": "nope", "action": "accept", "base_version": 0, "reviewer": "王"}
        assert post(f"{url}/api/decide", body).status_code == 404
        assert post(f"{url}/api/decide", {**body, "extra": 1}).status_code == 400
        unnamed = {"id": key, "action": "accept", "base_version": 0}
        assert "give your name" in post(f"{url}/api/decide", unnamed).text
        assert http("GET", f"{url}/", headers={"Host": "evil.example"}).status_code == 403
        assert rows(data / "review-ledger.jsonl") == []  # nothing refused was written
        page = http("GET", f"{url}/")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert "<script" in page.text and "http" not in page.text.split("<body>")[0]


def test_reviewer_and_cors_as_serve(data):
    review = Review(data)
    key = review.data.items[0].id
    origin = "http://intranet.example:3000"
    with serving(review, reviewer="财务处", cors_origins=(origin,)) as url:
        reply = decide(url, key, "accept", reviewer="someone else")
        assert reply.json()["state"]["reviewer"] == "财务处"  # --reviewer decides
        info = http("GET", f"{url}/api/info", headers={"Origin": origin})
        assert info.headers["access-control-allow-origin"] == origin
        other = http("GET", f"{url}/api/info", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------ the command line


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    result = runner.invoke(cli, ["review", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "holds no train.jsonl" in result.output
    (tmp_path / "qa.jsonl").write_text('{"instruction": "q", "output": "a"}\n', "utf-8")
    result = runner.invoke(cli, ["review", str(tmp_path / "qa.jsonl"), "--reviewer", " "])
    assert result.exit_code == 1 and "--reviewer: a name of 1 to 64" in result.output
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    result = runner.invoke(cli, ["review", str(tmp_path), "--api-key-env", "NO_SUCH_KEY"])
    assert result.exit_code == 1 and "NO_SUCH_KEY" in result.output
