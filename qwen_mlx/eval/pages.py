"""The eval report: ``report.md`` and a self-contained ``report.html``.

The HTML page needs nothing else to open: the loss curve is drawn as inline SVG from
``metrics.jsonl`` and all text is escaped. Its table puts each question beside the
reference and every model's answer, with per-answer scores.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from qwen_mlx.fsutil import write_text

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:6px;
vertical-align:top;text-align:left}th{background:#f3f3f3}.num{text-align:right}
.score{color:#666;font-size:85%}svg{background:#fafafa;border:1px solid #ddd}"""


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _judge_cell(judge: dict | None) -> str:
    if not judge or judge["accuracy"] is None:
        return "n/a"
    return f"{judge['accuracy']:.1f} ({judge['correct']}✓ {judge['partly']}½ {judge['wrong']}✗)"


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Column names and one row of cells per model (a judge column when a judge graded)."""
    judged = any("judge" in s for s in summary.values())
    head = ["model", "test loss", "perplexity", "ROUGE-L", "BLEU-4"]
    head += ["judge accuracy"] * judged + ["answers", "engine"]
    rows = [
        [
            label,
            _fmt(s["test_loss"]),
            _fmt(s["perplexity"], 2),
            f"{s['rouge_l']:.2f}",
            f"{s['bleu4']:.2f}",
            *[_judge_cell(s.get("judge"))] * judged,
            str(s["answers"]),
            s["model"],
        ]
        for label, s in summary.items()
    ]
    return head, rows


def _domain_cell(part: dict | None) -> str:
    if not part or not part["questions"]:
        return "n/a"
    judge = part.get("judge")
    accuracy = (
        f" · judge {judge['accuracy']:.1f}" if judge and judge["accuracy"] is not None else ""
    )
    return f"{part['rouge_l']:.2f}{accuracy} (n={part['questions']})"


def _refusal_cell(refusals: dict | None) -> str:
    if not refusals:
        return "n/a"
    return (
        f"{refusals['rate']:.0f}% ({refusals['refused']}/{refusals['questions']}, {refusals['by']})"
    )


def _drift_cell(drift: dict | None) -> str:
    return "n/a" if not drift else f"{drift['kl_per_token']:.4f} (n={drift['prompts']})"


def grade_note(report_dir: Path | None) -> str:
    """How to grade the answers of the report in ``report_dir`` by hand (docs/review.md)."""
    where = report_dir if report_dir is not None else "RUN"
    return (
        "Grade these answers yourself (correct / partly / wrong, with the right answer) in "
        f"the browser: qwen-mlx review {where}; the corrections become training data with "
        f"qwen-mlx data prepare --from-grades {where}."
    )


HOLDS_NOTE = (
    "in-domain: ROUGE-L on the answerable questions (judge accuracy when graded); unseen "
    "wording: those worded unlike any training question; refusals: share of the questions "
    "the rules do not answer that were answered with 'not covered' (1 − the invention rate); "
    "general drift: the tuned model's mean per-token KL from its base on general prompts the "
    "base answered (nats; lower is closer)."
)


def holds_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The "answers that hold" figures: a row per model."""
    head = ["model", "in-domain", "unseen wording", "refusals", "general drift"]
    rows = [
        [
            label,
            _domain_cell(s.get("in_domain")),
            _domain_cell(s.get("unseen_wording")),
            _refusal_cell(s.get("refusals")),
            _drift_cell(s.get("general_drift")),
        ]
        for label, s in summary.items()
    ]
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _scores(row: dict, label: str) -> str:
    text = f"ROUGE-L {row[f'{label}_rouge_l']:.1f} · BLEU-4 {row[f'{label}_bleu4']:.1f}"
    if f"{label}_judge" in row:
        text += f" · judge: {row[f'{label}_judge']} ({row[f'{label}_judge_reason']})"
    return text


def markdown(
    summary: dict, rows: list[dict], labels: list[str], report_dir: Path | None = None
) -> str:
    lines = ["# Evaluation", "", *_md_table(*summary_table(summary))]
    lines += ["", "ROUGE-L and BLEU-4: character level, 0–100, greedy answers.", ""]
    lines += ["## Answers that hold", "", *_md_table(*holds_table(summary)), "", HOLDS_NOTE, ""]
    lines += ["## Answers", "", grade_note(report_dir), ""]
    for i, row in enumerate(rows, start=1):
        lines += [f"### {i}. {row['question']}", "", f"**reference**: {row['reference']}", ""]
        for label in labels:
            lines += [f"**{label}** ({_scores(row, label)}): {row[label]}", ""]
    return "\n".join(lines)


def loss_svg(metrics_path: Path, width: int = 640, height: int = 240) -> str:
    """Training (line) and validation (dots) loss as inline SVG; empty if no metrics."""
    if not metrics_path.is_file():
        return ""
    metrics = [json.loads(x) for x in metrics_path.read_text(encoding="utf-8").splitlines() if x]
    train = [(m["step"], m["loss"]) for m in metrics if m.get("type") == "train"]
    valid = [(m["step"], m["val_loss"]) for m in metrics if m.get("type") == "eval"]
    points = train + valid
    if not points:
        return ""
    x_max = max(s for s, _ in points) or 1
    y_min, y_max = min(v for _, v in points), max(v for _, v in points)
    span = (y_max - y_min) or 1.0

    def xy(step: float, value: float) -> str:
        x = 40 + (width - 60) * step / x_max
        y = 10 + (height - 40) * (1 - (value - y_min) / span)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in train)
    dots = "".join(f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="3" '
                   'fill="#d62728"/>' for s, v in valid)  # fmt: skip
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>{dots}'
        f'<text x="40" y="{height - 8}" font-size="11">step 0</text>'
        f'<text x="{width - 80}" y="{height - 8}" font-size="11">step {x_max}</text>'
        f'<text x="2" y="14" font-size="11">{y_max:.2f}</text>'
        f'<text x="2" y="{height - 30}" font-size="11">{y_min:.2f}</text></svg>'
        '<p class="score">blue: training loss; red: validation loss</p>'
    )


def page(
    summary: dict,
    rows: list[dict],
    labels: list[str],
    metrics_path: Path,
    report_dir: Path | None = None,
) -> str:
    esc = html.escape
    cols = "".join(f"<th>{esc(label)}</th>" for label in labels)
    answers = ""
    for row in rows:
        cells = "".join(
            f"<td>{esc(row[label])}<div class='score'>{esc(_scores(row, label))}</div></td>"
            for label in labels
        )
        answers += (
            f"<tr><td>{esc(row['question'])}</td><td>{esc(row['reference'])}</td>{cells}</tr>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>qwen-mlx eval</title>"
        f"<style>{STYLE}</style></head><body><h1>Evaluation</h1>"
        f"{_html_table(*summary_table(summary))}"
        "<p class='score'>ROUGE-L and BLEU-4: character level, 0–100, greedy answers.</p>"
        f"<h2>Answers that hold</h2>{_html_table(*holds_table(summary))}"
        f"<p class='score'>{esc(HOLDS_NOTE)}</p>"
        f"<h2>Training</h2>{loss_svg(metrics_path) or '<p>no metrics.jsonl</p>'}"
        f"<h2>Answers</h2><p class='score'>{esc(grade_note(report_dir))}</p>"
        f"<table><tr><th>question</th><th>reference</th>{cols}</tr>{answers}"
        "</table></body></html>"
    )


def write_reports(
    out_dir: Path, summary: dict, rows: list[dict], labels: list[str], metrics_path: Path
) -> None:
    write_text(out_dir / "report.md", markdown(summary, rows, labels, out_dir))
    write_text(out_dir / "report.html", page(summary, rows, labels, metrics_path, out_dir))
