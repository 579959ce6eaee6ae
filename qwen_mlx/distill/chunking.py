"""Cut document text into chunks at its structure, each at most ``chunk_tokens`` tokens.

Boundaries are Markdown headings and Chinese regulation numbering: 第一章 / 第一节 /
第一条, ``1.1 住宿``, ``一、`` and ``（一）``. Inside an article (第N条) its own items
(（一）, 1. …) are body text, so an article stays whole. Consecutive small sections are
packed together up to the limit (never across top-level sections); a section that alone
is too long is cut at paragraphs (a table's rows kept together), then lines, then
sentences. Every chunk keeps its heading path (``3 差旅费 > 3.2 住宿``) and source file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_CN_NUM = "[一二三四五六七八九十百零〇两0-9]+"
# (pattern, rank): a smaller rank is a higher level; a heading pops every entry of its rank
# or lower from the path. Markdown levels 1–6 sit above the regulation numbering.
HEADINGS: list[tuple[re.Pattern, int]] = [
    (re.compile(rf"^第{_CN_NUM}[编篇]\s*\S*"), 7),
    (re.compile(rf"^第{_CN_NUM}章\s*\S*"), 8),
    (re.compile(rf"^第{_CN_NUM}节\s*\S*"), 9),
    (re.compile(r"^\d{1,2}(\.\d{1,2}){0,3}\s+\S.{0,40}$"), 10),  # "3 差旅费", "3.2 住宿"
    (re.compile(rf"^{_CN_NUM}、\S"), 14),
    (re.compile(rf"^[（(]{_CN_NUM}[)）]\S"), 15),
    (re.compile(rf"^第{_CN_NUM}条"), 16),
]
ARTICLE_RANK = 16
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+)$")
_SENTENCE_END = re.compile(r"(?<=[。！？；;.!?])")


@dataclass
class Chunk:
    id: str
    source: str
    heading: str
    text: str
    tokens: int


@dataclass
class _Section:
    path: list[str]
    lines: list[str] = field(default_factory=list)
    heading_only: bool = False


def _rank(line: str) -> int | None:
    md = _MD_HEADING.match(line)
    if md:
        return len(md.group(1))
    for pattern, rank in HEADINGS:
        if pattern.match(line):
            rank += line.count(".") if rank == 10 else 0  # 3.2 sits under 3
            return rank
    return None


def _title(line: str) -> str:
    md = _MD_HEADING.match(line)
    title = md.group(2) if md else line
    # An article's heading is its number; its text is the body.
    article = re.match(rf"^(第{_CN_NUM}条)", title)
    return article.group(1) if article else title.strip()[:40]


def sections(text: str) -> list[_Section]:
    """Split text at its headings; each section knows its heading path."""
    stack: list[tuple[int, str]] = []
    out = [_Section([])]
    for raw in text.splitlines():
        line = raw.strip()
        rank = _rank(line) if line else None
        in_article = bool(stack) and stack[-1][0] == ARTICLE_RANK
        if rank is not None and not (in_article and rank > 10 and rank != ARTICLE_RANK):
            while stack and stack[-1][0] >= rank:
                stack.pop()
            title = _title(line)
            stack.append((rank, title))
            path = [t for _, t in stack]
            if out[-1].heading_only:  # a bare heading travels with what it heads
                out[-1].path = path
            else:
                out.append(_Section(path))
            out[-1].heading_only = len(title) >= len(_MD_HEADING.sub(r"\2", line).strip())
        elif line:
            out[-1].heading_only = False
        if line:
            out[-1].lines.append(line)
    return [s for s in out if s.lines]


def _pieces(lines: list[str]) -> list[str]:
    """Lines grouped so a table's rows stay together."""
    pieces: list[str] = []
    for line in lines:
        if line.startswith("|") and pieces and pieces[-1].startswith("|"):
            pieces[-1] += "\n" + line
        else:
            pieces.append(line)
    return pieces


def _split_long(text: str, limit: int, count: Callable[[str], int]) -> list[str]:
    """Cut an over-long text at lines, then sentences, then characters."""
    for splitter in (lambda t: t.split("\n"), _SENTENCE_END.split):
        parts = [p for p in splitter(text) if p.strip()]
        if len(parts) > 1:
            return _pack(parts, limit, count, "\n" if "\n" in text else "")
    step = max(1, len(text) * limit // max(count(text), 1))
    return [text[i : i + step] for i in range(0, len(text), step)]


def _pack(parts: list[str], limit: int, count: Callable[[str], int], sep: str) -> list[str]:
    """Greedily join parts up to ``limit`` tokens; a part too long alone is cut further."""
    out: list[str] = []
    current, size = "", 0
    for part in parts:
        n = count(part)
        if n > limit:
            if current:
                out.append(current)
            out += _split_long(part, limit, count)
            current, size = "", 0
        elif current and size + n > limit:
            out.append(current)
            current, size = part, n
        else:
            current, size = (current + sep + part if current else part), size + n
    if current:
        out.append(current)
    return out


def _common_path(paths: list[list[str]]) -> list[str]:
    common = paths[0]
    for path in paths[1:]:
        i = 0
        while i < min(len(common), len(path)) and common[i] == path[i]:
            i += 1
        common = common[:i]
    return common


def _groups(secs: list[_Section], limit: int, count: Callable[[str], int]):
    """Consecutive sections packed up to ``limit``, never across a top-level section."""
    # Top level: one below the root every section shares (a document's own title).
    depth = len(_common_path([s.path for s in secs])) + 1 if len(secs) > 1 else 1
    group: list[tuple[_Section, str, int]] = []
    for sec in secs:
        text = "\n".join(sec.lines)
        n = count(text)
        top = sec.path[:depth]
        if group and (sum(g[2] for g in group) + n > limit or group[0][0].path[:depth] != top):
            yield group
            group = []
        group.append((sec, text, n))
    if group:
        yield group


def chunk_document(text: str, source: str, limit: int, count: Callable[[str], int]) -> list[Chunk]:
    """The document's chunks, in order, with ids ``<source>#<n>``."""
    chunks: list[Chunk] = []
    for group in _groups(sections(text), limit, count):
        paths = [sec.path for sec, _, _ in group]
        heading = " > ".join(_common_path(paths) or paths[0])
        body = "\n".join(t for _, t, _ in group)
        parts = (
            [body]
            if sum(n for *_, n in group) <= limit
            else _pack(_pieces(body.split("\n")), limit, count, "\n")
        )
        for part in parts:
            chunk_id = f"{source}#{len(chunks) + 1}"
            chunks.append(Chunk(chunk_id, source, heading, part, count(part)))
    return chunks


def estimate_tokens(text: str) -> int:
    """Qwen's tokenizer, roughly: ~1.4 Chinese characters or ~4 other characters a token."""
    cjk = sum(1 for ch in text if "\u3400" <= ch <= "\u9fff")
    return max(1, round(cjk / 1.4 + (len(text) - cjk) / 4))


def token_counter(model_path: str | None) -> tuple[Callable[[str], int], str | None]:
    """Count with the base model's tokenizer when its folder exists; else estimate.

    Returns the counter and, when estimating, the one line that says so."""
    from pathlib import Path

    if model_path and (Path(model_path) / "tokenizer.json").is_file():
        from qwen_mlx.tokens import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        return (lambda t: len(tokenizer.encode(t, add_special_tokens=False))), None
    note = (
        f"no tokenizer at model.path ({model_path}): chunk sizes are estimated from "
        "characters (about 1.4 Chinese characters a token)"
    )
    return estimate_tokens, note
