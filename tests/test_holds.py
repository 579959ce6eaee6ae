"""Answers that hold: replay of the base's own answers, refusals, and the general drift.

Users rely on: ``data replay`` writing the base model's greedy answers as ``kind: replay``
records (resumable, truncated answers left out), ``data.replay_ratio`` mixing that share of
tokens into training, eval's refusal rate on ``kind: unanswerable`` questions and in-domain
scores on answerable and unseen-wording ones, and the drift figure being the KL divergence
of the tuned model from its base (0 for an adapter that changes nothing; the same on both
backends). Random tiny models: these prove the measuring, never answer quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lora_helpers import make_peft_adapter, make_run
from rich.console import Console

from qwen_mlx.cli import cli
from qwen_mlx.eval.refusals import is_refusal

QUIET = Console(quiet=True)
PROMPTS = [
    "写一封简短的会议通知。",
    "What is 17 + 25?",
    "用一句话解释光合作用。",
    "Name three primary colors.",
    "把“今天天气很好”翻译成英文。",
]


def _prompts_file(path: Path) -> Path:
    lines = [
        json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": text}]})
        for i, text in enumerate(PROMPTS)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("answer", "refused"),
    [
        ("细则未规定此类费用，请咨询财务处。", True),
        ("本细则没有涉及该情况。", True),
        ("无法确定，建议咨询学院财务。", True),
        ("细则未对宠物寄养费作出规定。", True),
        ("目前没有关于体检费的规定。", True),
        ("The rules do not cover this; please ask the finance office.", True),
        ("每晚500元，请向财务处咨询。", False),  # an amount: answered, maybe invented
        ("伙食补助每人每天100元。", False),
        ("It is 550 yuan per night.", False),
        ("可以报销。", False),
        ("", False),
    ],
)
def test_a_refusal_is_told_from_an_answer(answer, refused):
    assert is_refusal(answer) is refused


# ---------------------------------------------------------------- the KL figure


def test_kl_matches_torchs_and_is_zero_for_the_same_model():
    torch = pytest.importorskip("torch")
    from qwen_mlx.eval.drift import kl_divergence

    rng = np.random.default_rng(0)
    base, tuned = rng.normal(size=(7, 50)) * 3, rng.normal(size=(7, 50)) * 3
    ours = kl_divergence(base, tuned)
    reference = torch.nn.functional.kl_div(
        torch.log_softmax(torch.tensor(tuned), -1),
        torch.log_softmax(torch.tensor(base), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-10)
    assert np.all(ours > 0) and np.allclose(kl_divergence(base, base), 0, atol=1e-12)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("holds")
    moved = make_peft_adapter(tiny_model_dir, root / "moved", b_std=0.01)
    still = make_peft_adapter(tiny_model_dir, root / "still", b_std=0.0)  # B = 0: no update
    return {"moved": moved, "still": still}


def _drift(backend: str, model_dir: Path, adapter: Path):
    from qwen_mlx.eval.drift import base_answers, measure
    from qwen_mlx.inference import open_engine
    from qwen_mlx.replay import load_prompts

    engine = open_engine(adapter, model=model_dir, backend=backend)
    if backend == "mlx":  # the stored bf16 in float32, as the torch engine runs on a CPU
        import mlx.core as mx

        engine.model.set_dtype(mx.float32)
    prompts = load_prompts(_prompts_file(adapter.parent / "p.jsonl"))
    return measure(engine, base_answers(engine, prompts, max_tokens=12), 256)


def test_drift_is_zero_for_an_adapter_that_changes_nothing(tiny_model_dir, adapters):
    still = _drift("torch", tiny_model_dir, adapters["still"])
    moved = _drift("torch", tiny_model_dir, adapters["moved"])
    assert still.tokens > 0 and still.prompts == len(PROMPTS)
    assert still.kl_per_token < 1e-9
    assert moved.kl_per_token > 1e-4 and moved.tokens == still.tokens  # the base's answers


def test_drift_is_the_same_on_mlx_and_torch(tiny_model_dir, adapters):
    pytest.importorskip("mlx_lm")
    torch_drift = _drift("torch", tiny_model_dir, adapters["moved"])
    mlx_drift = _drift("mlx", tiny_model_dir, adapters["moved"])
    assert mlx_drift.tokens == torch_drift.tokens
    assert mlx_drift.kl_per_token == pytest.approx(torch_drift.kl_per_token, rel=1e-3)


# ---------------------------------------------------------------- data replay


class _Answers:
    """An engine that answers prompt i with "answer i" and then ends its turn (the random
    tiny model never ends one), counting what it is asked."""

    from qwen_mlx.families import QWEN2 as family

    context_length, has_adapter, tokenizer = 4096, False, None

    def __init__(self):
        self.asked: list[str] = []
        self.ctrl_c_at: int | None = None  # Ctrl-C when asked this many questions

    def prompt_ids(self, messages, max_tokens):
        if len(self.asked) == self.ctrl_c_at:
            raise KeyboardInterrupt
        self.asked.append(messages[-1]["content"])
        return [PROMPTS.index(messages[-1]["content"])]

    def pieces(self, prompt_ids, settings):
        yield from ["answer", " ", str(prompt_ids[0])]


def test_replay_writes_one_record_per_answer_and_goes_on_after_a_stop(
    tiny_model_dir, tmp_path, monkeypatch
):
    engine = _Answers()
    monkeypatch.setattr("qwen_mlx.inference.open_engine", lambda *a, **k: engine)
    prompts = _prompts_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "replay.jsonl"
    args = ["data", "replay", "--model", tiny_model_dir, "-o", out, "--prompts", prompts]
    args = [str(a) for a in [*args, "-n", "3"]]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3 and {r["kind"] for r in records} == {"replay"}
    for record in records:
        asked = record["messages"][0]["content"]
        assert record["messages"][-1] == {
            "role": "assistant",
            "content": f"answer {PROMPTS.index(asked)}",
        }
    assert not out.with_name(out.name + ".partial").exists()

    # Ctrl-C after two answers: they are kept, and the rerun asks only for the third.
    out.unlink()
    engine.asked.clear()
    engine.ctrl_c_at = 2
    stopped = CliRunner().invoke(cli, args)
    assert stopped.exit_code == 130 and "run the same command again" in stopped.output
    assert not out.exists() and len(engine.asked) == 2
    engine.asked.clear()
    engine.ctrl_c_at = None
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "2 from an earlier run" in again.output, again.output
    assert engine.asked == [records[2]["messages"][0]["content"]]
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == records


def test_replay_leaves_out_answers_cut_off_and_never_overwrites_a_users_file(
    tiny_model_dir, tmp_path
):
    prompts = _prompts_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "replay.jsonl"
    args = ["data", "replay", "--model", tiny_model_dir, "-o", out, "--prompts", prompts]
    cut = CliRunner().invoke(cli, [str(a) for a in [*args, "--max-tokens", "1"]])
    assert cut.exit_code == 0, cut.output
    assert "reached --max-tokens 1" in cut.output and out.read_text() == ""
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"keep": "me"}\n')
    args[5] = mine
    refused = CliRunner().invoke(cli, [str(a) for a in args])
    assert refused.exit_code == 1 and "not written by" in refused.output
    assert mine.read_text() == '{"keep": "me"}\n'


# ---------------------------------------------------------------- replay in training


def _replay_records(path: Path, n: int) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"general question {i}"},
                {"role": "assistant", "content": f"a general answer number {i} " * 3},
            ],
            "kind": "replay",
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5])
def test_replay_takes_its_share_of_the_training_tokens(tiny_model_dir, small_data, tmp_path, ratio):
    from qwen_mlx.config_file import load_config
    from qwen_mlx.run_data import build_run_data
    from qwen_mlx.tokens import load_tokenizer

    replay = _replay_records(tmp_path / "replay.jsonl", 200)
    sets = [f"model.path={tiny_model_dir}", f"data.train_file={small_data}"]
    sets += ["data.valid_ratio=0", f"data.replay_file={replay}", f"data.replay_ratio={ratio}"]
    tokenizer = load_tokenizer(tiny_model_dir)
    plain = build_run_data(load_config(None, None, sets[:3]), tokenizer)
    mixed = build_run_data(load_config(None, None, sets), tokenizer)
    domain = sum(r.num_tokens for r in plain.train)
    total = sum(r.num_tokens for r in mixed.train)
    share = (total - domain) / total
    assert ratio <= share < ratio + 0.05, share
    if ratio:
        assert any(line.startswith("replay: ") for line in mixed.messages)
        again = build_run_data(load_config(None, None, sets), tokenizer)
        assert again.fingerprint == mixed.fingerprint  # seeded: a resume sees the same rows


def test_a_short_replay_file_says_so(tiny_model_dir, small_data, tmp_path):
    from qwen_mlx.config_file import load_config
    from qwen_mlx.run_data import build_run_data
    from qwen_mlx.tokens import load_tokenizer

    replay = _replay_records(tmp_path / "replay.jsonl", 2)
    sets = [f"model.path={tiny_model_dir}", f"data.train_file={small_data}"]
    sets += [f"data.replay_file={replay}", "data.replay_ratio=0.5"]
    data = build_run_data(load_config(None, None, sets), load_tokenizer(tiny_model_dir))
    assert any("ran short" in line and "data replay -n" in line for line in data.messages)


# ---------------------------------------------------------------- eval


def test_eval_reports_in_domain_unseen_refusals_and_drift(tiny_model_dir, adapters, tmp_path):
    from qwen_mlx.eval.evaluate import evaluate

    train = tmp_path / "train.jsonl"
    seen = {"instruction": "出差住宿标准是多少？", "output": "每晚500元。"}
    train.write_text(json.dumps(seen, ensure_ascii=False) + "\n", encoding="utf-8")
    run = make_run(tmp_path / "run", tiny_model_dir, adapters["moved"], f"data.train_file={train}")
    test = tmp_path / "test.jsonl"
    cases = [
        {**seen, "kind": "answerable"},
        {"instruction": "住宿费的报销标准怎么算？", "output": "每晚500元。", "kind": "answerable"},
        {
            "instruction": "买宠物粮能报销吗？",
            "output": "细则未规定，请咨询财务处。",
            "kind": "unanswerable",
        },
    ]
    test.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in cases), encoding="utf-8")
    general = _prompts_file(tmp_path / "general.jsonl")
    out = evaluate(
        run,
        test,
        backend="torch",
        max_tokens=8,
        general=general,
        general_prompts=3,
        console=QUIET,
    )
    tuned = json.loads((out / "summary.json").read_text(encoding="utf-8"))["tuned"]
    assert tuned["in_domain"]["questions"] == 2 and tuned["unseen_wording"]["questions"] == 1
    answers = [json.loads(x)["tuned"] for x in (out / "answers.jsonl").read_text().splitlines()]
    assert tuned["refusals"] == {
        "questions": 1,
        "refused": int(is_refusal(answers[2])),
        "rate": 100.0 * is_refusal(answers[2]),
        "by": "pattern",
    }
    assert tuned["general_drift"]["prompts"] == 3 and tuned["general_drift"]["kl_per_token"] > 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Answers that hold" in page and "general drift" in page


# ---------------------------------------------------------------- replay against forgetting


def test_replay_keeps_the_tuned_model_closer_to_its_base(tiny_model_dir, small_data, tmp_path):
    """bench/forgetting.py measures this over seeds (BENCHMARKS.md, "Forgetting"); here one
    small run with a loose bound keeps it from regressing: mixing the base's own answers in
    must leave less drift than the same training without them."""
    import torch
    from train_helpers import QUIET as SILENT

    from qwen_mlx.config_file import load_config, save_config
    from qwen_mlx.eval.drift import base_answers, measure
    from qwen_mlx.fsutil import write_jsonl
    from qwen_mlx.inference import open_engine
    from qwen_mlx.replay import HELDOUT, REPLAY, general_prompts, load_prompts, pick
    from qwen_mlx.training_run import train

    base = open_engine(None, model=tiny_model_dir, backend="torch")
    replay_prompts = pick(load_prompts(general_prompts(), REPLAY), 24, seed=0)
    replay = tmp_path / "replay.jsonl"
    torch.manual_seed(0)  # sampled at temperature 1: the base's own distribution, not its mode
    write_jsonl(replay, base_answers(base, replay_prompts, max_tokens=16, temperature=1.0))
    heldout = base_answers(base, pick(load_prompts(general_prompts(), HELDOUT), 6, 0), 12)

    def drift(*extra: str) -> tuple[int, float]:
        run = tmp_path / f"run{len(extra)}"
        sets = [f"model.path={tiny_model_dir}", "model.quantization=none"]
        sets += [f"data.train_file={small_data}", "training.num_epochs=6"]
        sets += ["training.learning_rate=2e-3", "training.warmup_steps=1", "training.seed=3"]
        sets += ["training.max_seq_length=256", f"output.dir={run}", *extra]
        cfg = load_config(None, None, sets)
        run.mkdir()
        save_config(cfg, run / "config.yaml")
        steps = train(cfg, run, False, SILENT).steps
        return steps, measure(open_engine(run, backend="torch"), heldout, 256).kl_per_token

    steps, plain = drift()
    # The same number of updates: replay's rows take some of them, as in the benchmark.
    _, mixed = drift(
        f"data.replay_file={replay}", "data.replay_ratio=0.5", f"training.max_steps={steps}"
    )
    assert 0 < mixed < plain, (mixed, plain)
