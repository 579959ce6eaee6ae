"""`data distill`, reading and chunking: every document type, made here, and the cuts."""

from __future__ import annotations

import pytest

from qwen_mlx.distill.chunking import chunk_document, estimate_tokens, token_counter
from qwen_mlx.distill.documents import read_documents
from qwen_mlx.errors import UserError

RULES = [
    "第一章 总则",
    "第一条 为规范学校差旅费管理，制定本细则。",
    "第二章 住宿费",
    "第二条 讲师到北京出差，住宿标准为每人每晚550元。",
]


def make_docx(path, lines, table=None):
    docx = pytest.importorskip("docx")
    document = docx.Document()
    document.add_heading("差旅费报销细则", level=1)
    for line in lines:
        document.add_paragraph(line)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, text in enumerate(row):
                grid.cell(r, c).text = text
    document.save(str(path))


def make_pdf(path, lines):
    pytest.importorskip("reportlab")
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))  # built in: no font file
    page = canvas.Canvas(str(path))
    page.setFont("STSong-Light", 12)
    for i, line in enumerate(lines):
        page.drawString(72, 760 - 20 * i, line)
    page.save()


def make_image_pdf(path):
    pytest.importorskip("reportlab")
    from reportlab.pdfgen import canvas

    page = canvas.Canvas(str(path))
    page.rect(72, 600, 300, 100, fill=1)  # drawn shapes only: no text layer
    page.save()


def test_every_type_is_read_with_its_chinese_text(tmp_path):
    (tmp_path / "a.txt").write_bytes("\n".join(RULES).encode("gbk"))
    (tmp_path / "b.md").write_text("# 细则\n" + "\n".join(RULES), encoding="utf-8")
    make_docx(tmp_path / "c.docx", RULES, table=[["职级", "北京"], ["讲师", "550元"]])
    make_pdf(tmp_path / "d.pdf", RULES)
    html = "<html><body><h2>住宿费</h2><p>" + "</p><p>".join(RULES) + "</p>"
    html += "<table><tr><td>讲师</td><td>550元</td></tr></table><script>x()</script></body></html>"
    (tmp_path / "e.html").write_text(html, encoding="utf-8")
    documents, problems = read_documents([tmp_path])
    assert problems == []
    texts = {d.path.suffix: d.text for d in documents}
    assert set(texts) == {".txt", ".md", ".docx", ".pdf", ".html"}
    for suffix, text in texts.items():
        assert "每人每晚550元" in text, suffix
    assert "# 差旅费报销细则" in texts[".docx"]  # a Word heading becomes a heading line
    assert "| 讲师 | 550元 |" in texts[".docx"]
    assert "## 住宿费" in texts[".html"] and "| 讲师 | 550元 |" in texts[".html"]
    assert "x()" not in texts[".html"]


def test_unreadable_files_are_one_line_each_and_the_rest_go_on(tmp_path):
    (tmp_path / "good.md").write_text("\n".join(RULES), encoding="utf-8")
    make_image_pdf(tmp_path / "scan.pdf")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n garbage")
    (tmp_path / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
    documents, problems = read_documents([tmp_path])
    assert [d.path.name for d in documents] == ["good.md"]
    by_file = {p.split(":")[0].rsplit("/", 1)[-1]: p for p in problems}
    assert set(by_file) == {"scan.pdf", "broken.pdf", "broken.docx"}
    assert "no text layer" in by_file["scan.pdf"] and "OCR" in by_file["scan.pdf"]
    assert all("\n" not in p for p in problems)


def test_an_encrypted_pdf_is_named_as_such(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    make_pdf(tmp_path / "plain.pdf", RULES)
    writer = pypdf.PdfWriter(clone_from=str(tmp_path / "plain.pdf"))
    writer.encrypt("secret")
    writer.write(str(tmp_path / "locked.pdf"))
    (tmp_path / "plain.pdf").unlink()
    (tmp_path / "ok.md").write_text(RULES[1], encoding="utf-8")
    _, problems = read_documents([tmp_path])
    assert len(problems) == 1 and "locked.pdf" in problems[0] and "encrypted" in problems[0]


def test_nothing_readable_is_a_user_error(tmp_path):
    make_image_pdf(tmp_path / "scan.pdf")
    with pytest.raises(UserError, match=r"scan\.pdf: no text layer"):
        read_documents([tmp_path / "scan.pdf"])
    with pytest.raises(UserError, match="not found"):
        read_documents([tmp_path / "missing.pdf"])


REGULATION = """# 报销细则
第一章 总则
第一条 为规范报销，制定本细则。
第二条 本细则适用于全校。报销应当：
（一）真实；
（二）合法。
第三章 差旅费
3.1 交通
乘坐高铁二等座。
3.2 住宿
| 职级 | 北京 | 上海 |
| 讲师 | 550 | 500 |
| 教授 | 800 | 700 |
"""


def test_chunks_follow_the_structure_and_never_split_an_article_or_table():
    chunks = chunk_document(REGULATION, "r.md", 30, estimate_tokens)
    texts = [c.text for c in chunks]
    # 第二条 keeps its items; the table stays with its section and whole.
    assert any("第二条" in t and "（二）合法" in t for t in texts)
    assert any("| 讲师 | 550 | 500 |\n| 教授 | 800 | 700 |" in t for t in texts)
    assert not any("第一条" in t and "3.1 交通" in t for t in texts)  # chapters not mixed
    assert chunks and all(c.tokens <= 30 for c in chunks)
    assert [c.id for c in chunks] == [f"r.md#{i}" for i in range(1, len(chunks) + 1)]
    by_text = {c.text.splitlines()[0]: c.heading for c in chunks}
    assert by_text["第二条 本细则适用于全校。报销应当："] == "报销细则 > 第一章 总则 > 第二条"
    assert any(h.startswith("报销细则 > 第三章 差旅费") for h in by_text.values())


def test_an_article_too_long_alone_is_cut_below_the_limit():
    long_article = "第九条 " + "出差人员应当按规定标准乘坐交通工具。" * 60
    chunks = chunk_document(long_article, "r.md", 64, estimate_tokens)
    assert len(chunks) > 1
    assert all(c.tokens <= 64 for c in chunks)
    assert "".join(c.text for c in chunks) == long_article
    assert {c.heading for c in chunks} == {"第九条"}


def test_the_model_tokenizer_counts_when_the_folder_exists(tiny_model_dir, tiny_tokenizer):
    count, note = token_counter(str(tiny_model_dir))
    assert note is None
    text = "第一条 为规范学校差旅费管理，制定本细则。"
    assert count(text) == len(tiny_tokenizer.encode(text, add_special_tokens=False))
    estimate, note = token_counter("models/none")
    assert estimate is estimate_tokens and "estimated" in note


def test_answers_that_are_empty_cut_off_or_about_the_passage_are_named():
    from qwen_mlx.distill.curate import answer_problem

    assert answer_problem({"content": "  ", "finish_reason": "stop"}) == "empty"
    assert answer_problem({"content": "住宿标准为", "finish_reason": "length"}) == "truncated"
    assert answer_problem({"content": "根据上文，每晚550元。", "finish_reason": "stop"}) == "meta"
    assert answer_problem({"content": "依据第四条，每晚550元。", "finish_reason": "stop"}) is None


def make_zip_bomb_docx(path, template, unpacked_mb):
    """A real .docx whose document.xml is ``unpacked_mb`` MB of paragraphs, packed ~250x."""
    import zipfile

    paragraph = b"<w:p><w:r><w:t>" + "住宿费".encode() * 60 + b"</w:t></w:r></w:p>"
    block = paragraph * 4000
    with zipfile.ZipFile(template) as source, zipfile.ZipFile(path, "w") as bomb:
        for part in source.infolist():
            if part.filename != "word/document.xml":
                bomb.writestr(part, source.read(part))
                continue
            head, tail = source.read(part).split(b"<w:body>")
            packed = zipfile.ZipInfo(part.filename)
            packed.compress_type = zipfile.ZIP_DEFLATED
            with bomb.open(packed, "w", force_zip64=True) as out:
                out.write(head + b"<w:body>")
                for _ in range(unpacked_mb * (1 << 20) // len(block)):
                    out.write(block)
                out.write(tail)


def test_a_zip_bomb_docx_is_skipped_at_once_naming_the_limit(tmp_path):

    make_docx(tmp_path / "plain.docx", RULES)
    make_zip_bomb_docx(tmp_path / "bomb.docx", tmp_path / "plain.docx", unpacked_mb=128)
    assert (tmp_path / "bomb.docx").stat().st_size < 2 << 20  # small on disk
    (tmp_path / "plain.docx").unlink()
    (problem,) = _only_good_md_read_within_2_s(tmp_path)
    assert "bomb.docx" in problem and "word/document.xml" in problem
    assert "100x limit" in problem and "\n" not in problem


def test_a_docx_of_too_much_xml_is_skipped_naming_the_limit(tmp_path, monkeypatch):
    from qwen_mlx.distill import documents

    make_docx(tmp_path / "big.docx", RULES * 2000)  # ordinary compression, about 4 MB of XML
    (tmp_path / "good.md").write_text("\n".join(RULES), encoding="utf-8")
    monkeypatch.setitem(documents.LIMITS, "markup_mb", 1)

    _, problems = read_documents([tmp_path])

    (problem,) = problems
    assert "big.docx" in problem and "over the 1 MB limit" in problem


def test_text_and_html_files_beyond_the_limits_are_skipped(tmp_path, monkeypatch):
    from qwen_mlx.distill import documents

    (tmp_path / "huge.html").write_text("<p>" + "出差" * 400_000 + "</p>", encoding="utf-8")
    (tmp_path / "long.txt").write_text("差旅费" * 100_000, encoding="utf-8")
    (tmp_path / "good.md").write_text("\n".join(RULES), encoding="utf-8")
    monkeypatch.setitem(documents.LIMITS, "markup_mb", 2)
    monkeypatch.setitem(documents.LIMITS, "text_chars", 200_000)

    documents_read, problems = read_documents([tmp_path])

    assert [d.path.name for d in documents_read] == ["good.md"]
    by_file = {p.split(":")[0].rsplit("/", 1)[-1]: p for p in problems}
    assert "over the 2 MB limit for a .html document" in by_file["huge.html"]
    assert "runs past 200,000 characters" in by_file["long.txt"]


def test_a_pdf_whose_pages_run_past_the_text_limit_stops_there(tmp_path, monkeypatch):
    from qwen_mlx.distill import documents

    pypdf = pytest.importorskip("pypdf")
    make_pdf(tmp_path / "one.pdf", RULES)
    writer = pypdf.PdfWriter(clone_from=str(tmp_path / "one.pdf"))
    page = writer.pages[0]
    for _ in range(199):  # 200 pages drawing the same content stream
        writer.add_page(page)
    writer.write(str(tmp_path / "many.pdf"))
    (tmp_path / "one.pdf").unlink()
    (tmp_path / "good.md").write_text("\n".join(RULES), encoding="utf-8")
    monkeypatch.setitem(documents.LIMITS, "text_chars", 2_000)
    pages_read = []
    extract = pypdf.PageObject.extract_text
    monkeypatch.setattr(
        pypdf.PageObject,
        "extract_text",
        lambda self, *a, **k: pages_read.append(1) or extract(self, *a, **k),
    )

    _, problems = read_documents([tmp_path])

    (problem,) = problems
    assert "many.pdf" in problem and "runs past 2,000 characters" in problem
    assert len(pages_read) < 100  # stopped at the limit, not after every page


def make_pdf_bomb(path, unpacked_mb):
    """A one-page PDF whose compressed content stream unpacks to ``unpacked_mb`` MB."""
    import zlib

    op = b"BT /F1 12 Tf 72 700 Td (A) Tj ET\n"
    stream = zlib.compress(op * (unpacked_mb * (1 << 20) // len(op)), 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    trailer = b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
    out += trailer % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def test_a_pdf_stream_bomb_is_skipped_at_once(tmp_path):

    pytest.importorskip("pypdf")
    make_pdf_bomb(tmp_path / "bomb.pdf", unpacked_mb=100)
    assert (tmp_path / "bomb.pdf").stat().st_size < 1 << 20
    (problem,) = _only_good_md_read_within_2_s(tmp_path)
    assert "bomb.pdf" in problem and "limit on one stream" in problem


def _only_good_md_read_within_2_s(tmp_path) -> list[str]:
    """Beside the file under test, a good.md: read the folder, which must take under 2 s and
    keep only good.md; return the problems."""
    import time

    (tmp_path / "good.md").write_text("\n".join(RULES), encoding="utf-8")
    started = time.monotonic()
    documents, problems = read_documents([tmp_path])
    assert time.monotonic() - started < 2
    assert [d.path.name for d in documents] == ["good.md"]
    return problems
