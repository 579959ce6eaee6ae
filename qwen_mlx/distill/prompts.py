"""The prompt templates, in the document's language, and ``--prompts FILE`` overrides.

Seven tasks: ``questions`` (what a reader of the passage would ask), ``answer`` (from the
passage alone, naming the article it rests on), ``verify`` (does the passage support the
answer?), ``followup`` (the reader's next question, for multi-turn records),
``paraphrase`` (a training question reworded: other words, another asker, colloquial or
formal), ``unanswerable`` (questions on the passage's topic that the rules leave open,
each with a short topic phrase) and ``check`` (does any of the most similar passages of
all the documents answer such a question?). Each has a ``system`` and a ``user`` text
with ``{placeholders}``. A prompts file (YAML) replaces any of them, e.g.
``zh: {answer: {system: "..."}}``.

:data:`REFUSAL` is the answer an unanswerable question is given (``distill.refusal``
replaces it), in the document's language; it names no office, since the rules' owner
differs from one organisation to the next.
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
    "paraphrase": {
        "system": "你是改写专家，把读者的问题换成别的说法。只输出 JSON。",
        "user": (
            "材料：\n{text}\n\n原问题：{question}\n\n"
            "请把原问题改写成 {n} 种不同的问法，意思和所问的事实完全不变（金额、职称、地点、天数等"
            "条件都要保留，原问题的背景也要写进问句里）。各种问法要明显不同：换用别的词语和句式，"
            "换一个提问者（如新入职的老师、研究生、财务人员），口语和正式书面语都要有。"
            '输出 {{"paraphrases": ["...", "..."]}}'
        ),
    },
    "unanswerable": {
        "system": "你负责设计规章没有覆盖的问题。只输出 JSON。",
        "user": (
            "下面是《{source}》中“{heading}”的一段材料。请提出 {n} 个读者可能会问、与这段材料"
            "主题相近、但这份规章很可能没有作出规定的问题（例如另一类费用、另一种人员、规章没有"
            "说到的情形）。不要问材料已经回答了的事。每个问题再给一个不超过 15 个字的主题短语"
            "（不含金额和数字），能填进“细则未对____作出规定”。\n"
            '输出格式：{{"questions": [{{"question": "...", "topic": "..."}}]}}\n\n'
            "材料：\n{text}"
        ),
    },
    "check": {
        "system": "你是规章查证员，判断规章是否回答了一个问题。只输出 JSON。",
        "user": (
            "下面是规章中与问题最相关的几段材料。\n\n{passages}\n\n问题：{question}\n\n"
            "这些材料中有没有任何一段回答了这个问题（哪怕只是部分回答，或给出了适用的金额、条件"
            '或流程）？输出 {{"answered": true 或 false, "passage": 回答它的材料编号或 0, '
            '"reason": "一句话理由"}}'
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
    "paraphrase": {
        "system": "You reword a reader's question. Output JSON only.",
        "user": (
            "Passage:\n{text}\n\nQuestion: {question}\n\n"
            "Reword the question in {n} clearly different ways that ask exactly the same thing "
            "(keep every condition: amounts, roles, places, days; fold any background into the "
            "question itself). Vary the words and the sentence, the asker (a new lecturer, a "
            "PhD student, a finance officer) and the register, colloquial and formal. "
            'Output {{"paraphrases": ["...", "..."]}}'
        ),
    },
    "unanswerable": {
        "system": "You write questions the rules do not cover. Output JSON only.",
        "user": (
            "Below is a passage of '{source}', section '{heading}'. Write {n} questions a "
            "reader might ask, close to this passage's topic, that these rules most likely do "
            "not settle (another kind of expense, another group of people, a case the rules "
            "leave open). Do not ask what the passage answers. Give each a short topic phrase "
            "(at most 8 words, no amounts or numbers) that fits 'The rules do not cover ____'.\n"
            'Format: {{"questions": [{{"question": "...", "topic": "..."}}]}}\n\n'
            "Passage:\n{text}"
        ),
    },
    "check": {
        "system": "You check whether rules answer a question. Output JSON only.",
        "user": (
            "Below are the passages of the rules most related to the question.\n\n{passages}"
            "\n\nQuestion: {question}\n\nDoes any passage answer the question, even in part "
            "(an amount, condition or procedure that applies)? "
            'Output {{"answered": true or false, "passage": its number or 0, '
            '"reason": "one sentence"}}'
        ),
    },
}

DEFAULTS = {"zh": ZH, "en": EN}
# The answer to a question the rules leave open; {topic} is the teacher's topic phrase.
REFUSAL = {
    "zh": "细则未对{topic}作出规定，请咨询相关管理部门。",
    "en": "The rules do not cover {topic}; please ask the office responsible.",
}
# How the check prompt numbers the passages it shows.
PASSAGE = {
    "zh": "材料{n}（《{source}》{heading}）：\n{text}",
    "en": "Passage {n} ('{source}', {heading}):\n{text}",
}
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
