"""Telling a refusal ("the rules do not cover this") from an answer, without a judge.

For a finance office an invented amount is worse than "细则未规定，请咨询财务处". ``eval`` counts
how often the model says so on the questions the rules do not answer (``kind:
unanswerable``): a judge decides when one is given; otherwise a reply that says, in Chinese
or English, that the rules or documents do not cover it, or that the asker should consult
someone, counts as a refusal. The patterns are deliberately plain phrases, not a model: they
undercount unusual wordings (say so with a judge) and never count an amount as a refusal.
"""

from __future__ import annotations

import re

# Phrases of "not covered / cannot tell / ask someone", as a distilled refusal writes them.
_PATTERNS = (
    r"(细则|规定|制度|办法|文件|文档|资料)[^。！？\n]{0,12}(未|没有|并未|尚未|不)(作出?|做出?)?"
    r"(规定|涉及|明确|提及|说明|覆盖|包括|包含)",
    r"(未|没有|并未|尚未)(作出?|做出?)?(明确|具体|相关)?(规定|说明|提及|涉及)",
    r"(未|没有|并未|尚未)(对|就)[^。！？\n]{1,24}(作出?|做出?|进行)?(明确|具体)?(规定|说明)",
    r"没有(关于|针对|涉及)[^。！？\n]{1,24}的?(规定|条款|说明|内容)",
    r"(无法|不能|难以)(确定|判断|回答|答复|给出)",
    r"(请|建议)[^。！？\n]{0,15}(咨询|确认|询问)",
    r"\b(not|isn't|aren't|doesn't|don't|do not|does not|is not|are not)\b[^.!?\n]{0,30}"
    r"\b(cover|covered|address|addressed|specify|specified|mention|mentioned|say|state)\b",
    r"\b(no|without) (rule|provision|information|guidance)\b",
    r"\b(cannot|can't|unable to) (determine|tell|answer|say|find)\b",
    r"\bplease (ask|contact|consult|check with)\b",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in _PATTERNS), re.IGNORECASE)
# An amount of money: an answer that names one has answered, whatever else it says.
_AMOUNT = re.compile(r"\d+(?:\.\d+)?\s*(?:元|块|万元|yuan|rmb|cny)|[¥￥]\s*\d", re.IGNORECASE)


def is_refusal(answer: str) -> bool:
    """Whether ``answer`` says the rules do not cover the question (or whom to ask), and
    names no amount."""
    answer = answer or ""
    return bool(_REFUSAL.search(answer)) and not _AMOUNT.search(answer)
