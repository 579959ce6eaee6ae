"""`data distill`'s answers that hold (issue 22): paraphrases of training questions, a
cluster-wise split that keeps near-different questions and drops only exact repeats, and
questions the documents leave open, checked against every document's chunks; against the
loopback teacher (tests/teacher_stub.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from teacher_stub import OPEN_TOPICS, UNSUPPORTED_MARK, TeacherStub, default_reply, rules_file

from qwen_mlx.cli import cli
from qwen_mlx.distill.curate import NEAR_DUPLICATE, held_out, jaccard, shingles
from qwen_mlx.eval.refusals import is_refusal

pytest.importorskip("openai")

RULES = """# 差旅费报销细则
## 第一章 总则
第一条 为规范学校差旅费管理，根据国家有关规定，制定本细则。
第二条 本细则适用于学校全体教职工因公出差。出差人员应当先审批后出差。
## 第二章 住宿费
第三条 住宿费在标准内凭发票据实报销，超出部分自理。
第四条 讲师到北京出差，住宿标准为每人每晚550元；到上海出差，标准为每人每晚500元。
## 第三章 伙食补助
第五条 伙食补助按出差天数包干发放，每人每天100元。到西藏、青海、新疆出差，每人每天120元。
"""
ABROAD = """# 出国（境）经费管理办法
## 第二章 开支范围
第八条 因公出国的签证费、护照费凭票据实报销；出国签证费须附邀请函复印件。
"""
SETTINGS = ["--teacher-model", "teacher", "--questions-per-chunk", "3", "--chunk-tokens", "80"]
SETTINGS += ["--set", "distill.followup_ratio=0"]
BEIJING, SHANGHAI = "讲师到北京出差，住宿每晚能报多少钱？", "讲师到上海出差，住宿每晚能报多少钱？"
NEAR_SHANGHAI = "讲师到上海出差，住宿每晚最多能报多少钱？"  # Jaccard 0.78 to SHANGHAI


@pytest.fixture
def rules(tmp_path, monkeypatch):
    return rules_file(tmp_path, monkeypatch, RULES)


def distill(url, docs, out, *extra):
    args = ["data", "distill", *map(str, docs), "-o", str(out), "--teacher-url", url]
    result = CliRunner().invoke(cli, [*args, *SETTINGS, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def rows(out, name):
    return [json.loads(x) for x in (out / name).read_text(encoding="utf-8").splitlines()]


def task(body, word):
    return word in body["messages"][0]["content"]


def test_each_training_question_gets_paraphrases_answered_and_checked(rules, tmp_path):
    def reply(body):  # the second rewording of each question gets an unsupported answer
        text = default_reply(body)
        asked = body["messages"][1]["content"].split("问题：")[-1]
        answering = not any(task(body, w) for w in ("出题", "审核员", "改写", "没有覆盖", "查证员"))
        return text + UNSUPPORTED_MARK if answering and "我是新来的老师" in asked else text

    with TeacherStub() as stub:
        stub.reply = reply
        report = distill(stub.url, [rules], tmp_path / "out", "--unanswerable-ratio", "0")
        bodies = [b for _, b in stub.requests]
    train, test = rows(tmp_path / "out", "train.jsonl"), rows(tmp_path / "out", "test.jsonl")
    originals = [r for r in train if r["source"]["origin"] == "question"]
    paraphrases = [r for r in train if r["source"]["origin"] == "paraphrase"]
    assert originals and all(r["source"]["origin"] == "question" for r in test)  # train only
    # two rewordings asked for each training question; the second failed its check
    assert sum(task(b, "改写") for b in bodies) == len(originals)
    assert report["drops"] == {"unsupported": len(originals)}
    assert len(paraphrases) == len(originals)
    by_question = {r["instruction"]: r for r in originals}
    for p in paraphrases:
        original = by_question[p["source"]["rewords"]]
        assert p["instruction"] == "请问，" + original["instruction"]
        assert p["source"]["cluster"] == original["source"]["cluster"] and p["kind"] == "answerable"
        assert p["output"] == original["output"]  # answered from its chunk, like any question
        # its own answer request and its own grounding check
        for word in ("熟悉本单位规章", "审核员"):
            assert sum(task(b, word) and p["instruction"] in str(b) for b in bodies) == 1, word
    assert report["by_origin"]["train"] == {
        "paraphrase": len(paraphrases),
        "question": len(originals),
    }
    assert report["requests"]["sent"] < report["planned_requests"]  # the drops asked no more


def test_a_cluster_goes_whole_to_one_side_and_only_exact_repeats_are_dropped(rules, tmp_path):
    def reply(body):
        if task(body, "出题") and "第四条" in body["messages"][1]["content"]:
            near = [{"question": q, "input": ""} for q in (BEIJING, SHANGHAI, BEIJING[:-1])]
            return json.dumps({"questions": near}, ensure_ascii=False)
        if task(body, "改写"):  # every question's second rewording comes near 上海's
            question = body["messages"][1]["content"].split("原问题：", 1)[1].split("\n\n")[0]
            texts = ["请问，" + question, NEAR_SHANGHAI]
            return json.dumps({"paraphrases": texts}, ensure_ascii=False)
        return default_reply(body)

    sides = []
    with TeacherStub() as stub:
        stub.reply = reply
        for seed in range(6):  # one folder: the ledger answers every split's requests alike
            extra = ("--test-ratio", "0.5", "--set", f"training.seed={seed}")
            report = distill(stub.url, [rules], tmp_path / "out", *extra)
            train, test = (
                rows(tmp_path / "out", "train.jsonl"),
                rows(tmp_path / "out", "test.jsonl"),
            )
            originals = {r["instruction"]: r for r in train if r["source"]["origin"] == "question"}
            originals |= {r["instruction"]: r for r in test}
            # near-different questions are both kept, in one cluster; the repeat is not
            assert (
                originals[BEIJING]["source"]["cluster"] == originals[SHANGHAI]["source"]["cluster"]
            )
            held_out = BEIJING in {r["instruction"] for r in test}
            sides.append(held_out)
            # the first NEAR_SHANGHAI: dropped near the test's 上海, or kept; the rest repeat it
            trained = report["by_origin"]["train"]["question"]
            assert report["drops"] == {
                "duplicate": trained,
                **({"near_test": 1} if held_out else {}),
            }
            assert (NEAR_SHANGHAI in {r["instruction"] for r in train}) != held_out
            clusters = {}
            for name, records in (("train", train), ("test", test)):
                for r in records:
                    assert clusters.setdefault(r["source"]["cluster"], name) == name
            for t in test:  # no test question has a near-duplicate in training, paraphrases too
                near = [
                    jaccard(shingles(t["instruction"]), shingles(r["instruction"])) for r in train
                ]
                assert max(near) < NEAR_DUPLICATE
            summary = report["clusters"]
            assert summary["total"] == len(clusters)
            assert summary["test"] == sum(side == "test" for side in clusters.values())
            assert sum(int(k) * n for k, n in summary["sizes"].items()) == len(train) + len(test)
            assert report["kept"] == len(train) + len(test)
            assert report["dropped"] == sum(report["drops"].values())
    assert True in sides and False in sides  # the 北京/上海 cluster was held out, and trained on
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Clusters" in markdown and "records in the cluster" in markdown
    assert BEIJING in markdown and SHANGHAI in markdown  # the largest cluster is listed


def test_an_unanswerable_question_another_document_answers_is_dropped(rules, tmp_path):
    abroad = tmp_path / "abroad.md"
    abroad.write_text(ABROAD, encoding="utf-8")
    asked = [
        ("出国签证费可以报销吗？", "出国签证费"),
        ("学术会议注册费可以报销吗？", "学术会议注册费"),
    ]
    asked += [("住宿超标500元以上怎么办？", "超标500元以上的住宿费")]  # a refusal naming an amount

    def reply(body):
        if task(body, "没有覆盖"):  # every chunk proposes the same three: repeats are dropped
            items = [{"question": q, "topic": t} for q, t in asked]
            return json.dumps({"questions": items}, ensure_ascii=False)
        return default_reply(body)

    with TeacherStub() as stub:
        stub.reply = reply
        extra = ("--paraphrases", "0", "--unanswerable-ratio", "1")
        report = distill(stub.url, [rules, abroad], tmp_path / "out", *extra)
        checks = [b["messages"][1]["content"] for _, b in stub.requests if task(b, "查证员")]
    # the check of the visa question shows the other document's chunk, which answers it
    visa = [c for c in checks if "出国签证费可以报销吗" in c]
    assert len(visa) == 1 and "第八条 因公出国的签证费" in visa[0] and "第四条" in visa[0]
    assert len(checks) == 2
    chunks = report["chunks"]
    assert report["drops"] == {
        "answered_in_documents": 1,
        "bad_topic": 1,
        "duplicate": 3 * (chunks - 1),
    }
    kept = rows(tmp_path / "out", "train.jsonl") + rows(tmp_path / "out", "test.jsonl")
    open_ = [r for r in kept if r["kind"] == "unanswerable"]
    assert [r["instruction"] for r in open_] == ["学术会议注册费可以报销吗？"]
    assert open_[0]["output"] == "细则未对学术会议注册费作出规定，请咨询相关管理部门。"
    assert open_[0]["source"]["origin"] == "unanswerable" and is_refusal(open_[0]["output"])


def test_both_splits_get_their_share_of_unanswerable_questions(rules, tmp_path):
    with TeacherStub() as stub:
        extra = ("--paraphrases", "1", "--unanswerable-ratio", "0.5", "--test-ratio", "0.3")
        report = distill(stub.url, [rules], tmp_path / "out", *extra)
    train, test = rows(tmp_path / "out", "train.jsonl"), rows(tmp_path / "out", "test.jsonl")
    for records in (train, test):
        kinds = {r["kind"] for r in records}
        assert kinds == {"answerable", "unanswerable"}
        for r in records:
            if r["kind"] == "unanswerable":
                assert any(t in r["output"] for t in OPEN_TOPICS) and is_refusal(r["output"])
            else:
                assert r["source"]["origin"] in ("question", "paraphrase")
    open_train = sum(r["kind"] == "unanswerable" for r in train)
    open_test = sum(r["kind"] == "unanswerable" for r in test)
    assert report["by_kind"]["train"]["unanswerable"] == open_train
    assert report["by_kind"]["test"] == {
        "answerable": len(test) - open_test,
        "unanswerable": open_test,
    }
    # 5 asked (50% of 3 × 3) from four topics: the repeats dropped, 30% of the rest held out
    repeats = report["drops"].pop("duplicate")
    assert open_train + open_test + repeats == 5 and report["drops"] == {}
    assert open_test == held_out(open_train + open_test, 0.3) >= 1


@pytest.mark.parametrize("topic", ["出国签证费", "研究生出国访学的保险费", "外聘专家讲课费标准"])
def test_the_default_refusal_is_counted_as_a_refusal_by_eval(topic):
    from qwen_mlx.distill.prompts import REFUSAL

    for template in REFUSAL.values():
        assert "{topic}" in template
        assert is_refusal(template.replace("{topic}", topic))
    assert is_refusal(REFUSAL["en"].replace("{topic}", "visa fees for trips abroad"))
    assert not any(w in REFUSAL["zh"] for w in ("财务处", "处", "学校"))  # names no office


def test_a_refusal_template_must_have_a_topic_and_is_used_as_given(rules, tmp_path):
    bad = CliRunner().invoke(
        cli, ["data", "distill", str(rules), "-o", "o", "--plan", "--set", "distill.refusal=不知道"]
    )
    assert bad.exit_code == 1 and "a text with {topic} in it" in bad.output
    with TeacherStub() as stub:
        mine = "本办法没有规定{topic}，请咨询财务处。"
        extra = (
            "--paraphrases",
            "0",
            "--unanswerable-ratio",
            "0.4",
            "--set",
            f"distill.refusal={mine}",
        )
        distill(stub.url, [rules], tmp_path / "out", *extra)
    kept = rows(tmp_path / "out", "train.jsonl") + rows(tmp_path / "out", "test.jsonl")
    refusals = [r["output"] for r in kept if r["kind"] == "unanswerable"]
    assert refusals and all(r.startswith("本办法没有规定") for r in refusals)


def test_plan_counts_paraphrases_and_unanswerable_questions():
    from qwen_mlx.config import Config
    from qwen_mlx.distill.chunking import Chunk
    from qwen_mlx.distill.run import Corpus, plan

    chunk = Chunk(id="a#1", source="a", heading="h", text="第一条 出差须先审批。", tokens=10)
    corpus = Corpus([], [chunk] * 10, [])
    cfg = Config()
    cfg.distill.questions_per_chunk, cfg.distill.followup_ratio = 5, 0
    # 50 questions: 5 held out, 45 paraphrased twice; 5 unanswerable, on every other chunk
    assert plan(corpus, cfg)["requests_by_kind"] == {
        "questions": 10,
        "answers": 50,
        "grounding": 50,
        "follow-ups": 0,
        "unanswerable": 5,
        "unanswerable checks": 5,
        "paraphrases": 45,
        "paraphrase answers": 90,
        "paraphrase grounding": 90,
    }
    cfg.distill.paraphrases, cfg.distill.unanswerable_ratio = 0, 0
    assert plan(corpus, cfg)["requests"] == 110  # as before paraphrases: 1 + 2 × 5 a chunk


def test_near_duplicates_at_the_documented_threshold_cluster_and_only_exact_repeats_drop():
    from qwen_mlx.distill.curate import clusters, exact_duplicates

    questions = [
        "出差住宿每晚能报多少钱？",
        "出差住宿每晚最多能报多少钱？",  # a rewording (0.69): same cluster, kept
        "出差的伙食补助怎么算？",
        "出差的伙食补助怎么算",  # punctuation only: an exact repeat, dropped
        "公杂费包括哪些费用？",
        "到北京参加会议的差旅费由谁审批？",
        "到上海参加会议的差旅费由谁审批？",  # one name apart (0.65): kept, in 北京's cluster
    ]
    assert exact_duplicates(questions, set()) == [3]
    assert clusters(questions) == [0, 0, 1, 1, 2, 3, 3]
    # a link (a follow-up and its first turn) joins clusters whatever the words
    assert clusters(questions, [(4, 2)]) == [0, 0, 1, 1, 1, 2, 2]
    # single linkage: a chain of near pairs is one cluster, so no pair spans the split
    chain = ["甲乙丙丁戊己庚辛", "甲乙丙丁戊己庚辛壬癸", "丙丁戊己庚辛壬癸", "子丑寅卯"]
    assert clusters(chain) == [0, 0, 0, 1]


def test_bm25_ranks_the_chunk_that_shares_the_rare_terms_first():
    from qwen_mlx.distill.retrieval import BM25, terms

    assert terms("出国签证费 visa Fees") == ["出国", "国签", "签证", "证费", "visa", "fees"]
    chunks = [
        "第三条 住宿费在标准内凭发票据实报销，超出部分自理。",
        "第八条 因公出国的签证费、护照费凭票据实报销。",
        "第五条 伙食补助按出差天数包干发放。",
        "Article 9. Visa fees are reimbursed against receipts.",
    ]
    index = BM25(chunks)
    assert index.top("出国签证费可以报销吗？", 2) == [1, 0]  # 报销 is shared, 签证 is rare
    assert index.top("are visa fees covered?", 1) == [3]
    assert index.top("天气", 3) == []  # nothing shared: nothing shown


def test_every_template_formats_in_both_languages_and_the_new_ones_can_be_overridden(tmp_path):
    from qwen_mlx.distill.prompts import DEFAULTS, load_prompts, messages

    fields = {"source": "s", "heading": "h", "text": "t", "question": "q", "answer": "a"}
    fields |= {"n": 2, "passages": "p"}
    for lang, tasks in DEFAULTS.items():
        assert set(tasks) == {
            *("questions", "answer", "verify", "followup"),
            *("paraphrase", "unanswerable", "check"),
        }
        for task_name in tasks:
            system, user = messages(DEFAULTS, lang, task_name, **fields)
            assert system["content"] and "{" not in user["content"].replace('{"', "")
    mine = tmp_path / "prompts.yaml"
    mine.write_text("zh:\n  paraphrase:\n    system: 你是改写专家，只改说法。\n", encoding="utf-8")
    assert load_prompts(mine)["zh"]["paraphrase"]["system"] == "你是改写专家，只改说法。"
