"""The prompt templates, in the document's language, and ``--prompts FILE`` overrides.

Four tasks: ``questions`` (what a reader of the passage would ask), ``answer`` (from the
passage alone, naming the article it rests on), ``verify`` (does the passage support the
answer?) and ``followup`` (the reader's next question, for multi-turn records). Each has
a ``system`` and a ``user`` text with ``{placeholders}``. A prompts file (YAML) replaces
any of them, e.g. ``zh: {answer: {system: "..."}}``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from qwen_mlx.errors import UserError

ZH = {
    "questions": {
        "system": "你是出题专家。任务：根据规章材料出题。只输出 JSON。",
        "user": (
            "下面是《{source}》中“{heading}”的一段材料。请以不同读者的身份（如教师、学生、"
            "财务人员、行政人员）提出 {n} 个读者真正会问的问题：包括事实、金额与标准、办理流程、"
            "“如果……怎么办”的情形。每个问题都必须能只凭这段材料回答，问题之间不要重复或换说法。"
            "可以给部分问题加上提问者的背景（如职称、出差地、天数），放在 input 字段，"
            "其余 input 为空。\n"
            '输出格式：{{"questions": [{{"question": "...", "input": ""}}]}}\n\n'
            "材料：\n{text}"
        ),
    },
    "answer": {
        "system": "你是熟悉本单位规章的工作人员，回答准确、简洁、友好。",
        "user": (
            "只根据下面的材料回答问题，并在回答中指出所依据的条款（如“依据第十条”）。"
            "直接回答，不要出现“根据上文”“根据材料”之类的说法；材料没有规定的不要编造。\n\n"
            "材料（《{source}》{heading}）：\n{text}\n\n问题：{question}"
        ),
    },
    "verify": {
        "system": "你是严格的审核员。任务：核对回答是否有材料依据。只输出 JSON。",
        "user": (
            "材料：\n{text}\n\n问题：{question}\n回答：{answer}\n\n"
            "回答中的每一个事实（金额、条件、流程）都能在材料中找到依据吗？"
            '输出 {{"supported": true 或 false, "reason": "一句话理由"}}'
        ),
    },
    "followup": {
        "system": "你是提出追问的读者。只输出 JSON。",
        "user": (
            "材料：\n{text}\n\n你问过：{question}\n得到的回答：{answer}\n\n"
            "请以同一位读者的身份提一个紧接着的追问（例如换一种情形：职称、地点、天数或金额不同），"
            '它必须能只凭这段材料回答。输出 {{"question": "..."}}'
        ),
    },
}

EN = {
    "questions": {
        "system": "You write exam questions from rule documents. Output JSON only.",
        "user": (
            "Below is a passage of '{source}', section '{heading}'. Acting as different readers "
            "(staff, students, finance officers), write {n} questions a reader would really ask: "
            "facts, amounts and thresholds, procedures, 'what if' cases. Each must be answerable "
            "from this passage alone; no two may be paraphrases. Some may carry the asker's "
            "situation (role, destination, days) in `input`; leave it empty otherwise.\n"
            'Format: {{"questions": [{{"question": "...", "input": ""}}]}}\n\nPassage:\n{text}'
        ),
    },
    "answer": {
        "system": "You know these rules well and answer accurately, briefly and kindly.",
        "user": (
            "Answer from the passage below only, and name the article or section it rests on. "
            "Answer directly; never say 'according to the passage'. Invent nothing the passage "
            "does not say.\n\nPassage ('{source}', {heading}):\n{text}\n\nQuestion: {question}"
        ),
    },
    "verify": {
        "system": "You are a strict reviewer. Output JSON only.",
        "user": (
            "Passage:\n{text}\n\nQuestion: {question}\nAnswer: {answer}\n\n"
            "Is every fact in the answer (amounts, conditions, steps) supported by the passage? "
            'Output {{"supported": true or false, "reason": "one sentence"}}'
        ),
    },
    "followup": {
        "system": "You are the reader asking a follow-up question. Output JSON only.",
        "user": (
            "Passage:\n{text}\n\nYou asked: {question}\nThe answer: {answer}\n\n"
            "As the same reader, ask the natural next question (e.g. a different case: role, "
            "place, days or amount), answerable from this passage alone. "
            'Output {{"question": "..."}}'
        ),
    },
}

DEFAULTS = {"zh": ZH, "en": EN}
# How a follow-up is put to the answer and verify prompts: with the turn before it.
FOLLOWUP_FRAME = {
    "zh": "此前的对话——问：{question}\n答：{answer}\n\n追问：{followup}",
    "en": "Earlier: Q: {question}\nA: {answer}\n\nFollow-up: {followup}",
}


def language(text: str) -> str:
    """``zh`` when a good share of the letters are Chinese, else ``en``."""
    letters = [ch for ch in text if ch.isalpha()]
    cjk = sum(1 for ch in letters if "\u3400" <= ch <= "\u9fff")
    return "zh" if letters and cjk / len(letters) > 0.2 else "en"


def _overrides(raw: object, path: Path):
    """``(language, task, part, text)`` for each template a prompts file sets."""
    bad = UserError(
        f"--prompts {path}: expected language → task → system/user, "
        "e.g. zh: {answer: {user: '...'}}; see the defaults in qwen_mlx/distill/prompts.py"
    )
    if not isinstance(raw, dict):
        raise bad
    for lang, tasks in raw.items():
        if lang not in DEFAULTS or not isinstance(tasks, dict):
            raise bad
        for task, parts in tasks.items():
            if task not in ZH or not isinstance(parts, dict):
                raise bad
            for part, text in parts.items():
                if part not in ("system", "user"):
                    raise bad
                yield lang, task, part, str(text)


def load_prompts(path: Path | None) -> dict[str, dict[str, dict[str, str]]]:
    """The default templates with a prompts file laid over them (unknown keys are errors)."""
    prompts = {
        lang: {task: dict(parts) for task, parts in tasks.items()}
        for lang, tasks in DEFAULTS.items()
    }
    if path is None:
        return prompts
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"--prompts {path}: cannot read it ({type(err).__name__})") from None
    for lang, task, part, text in _overrides(raw, path):
        prompts[lang][task][part] = text
    return prompts


def messages(prompts: dict, lang: str, task: str, **fields: object) -> list[dict[str, str]]:
    """The chat messages for one request."""
    template = prompts[lang][task]
    try:
        user = template["user"].format(**fields)
    except (KeyError, IndexError) as err:
        raise UserError(
            f"prompt {lang}.{task}.user uses an unknown placeholder {err}; "
            f"available: {', '.join('{' + k + '}' for k in fields)}"
        ) from None
    return [{"role": "system", "content": template["system"]}, {"role": "user", "content": user}]
