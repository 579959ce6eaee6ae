"""Read rule documents (.md, .txt, .docx, .pdf, .html) into plain text with headings.

Headings come out as Markdown ``#`` lines and tables as ``| a | b |`` rows, whatever the
source format, so the chunker has one kind of structure to look at. A file that cannot be
read (no text layer, encrypted, corrupt) is one problem line naming it; the others go on.

What one document may expand to is bounded before it is parsed (``LIMITS``): a rule book is
a few MB of text, and a crafted or broken file (a 1.5 MB .docx holding 900 MB of XML, a PDF of
pages whose text runs to gigabytes) would otherwise take minutes and gigabytes of memory. Such
a file is skipped as unreadable, with one line naming the limit it passed.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen_mlx.errors import UserError

_MISSING = "pip install 'qwen-mlx[docs]' to read {suffix} files"

MB = 1 << 20
# Far beyond any real rule document, and small enough that reading one stays seconds and
# hundreds of MB of memory. "Markup" is what a parser builds a tree of: a text or HTML file
# as it is, a .docx's XML parts as they unpack.
LIMITS = {
    "file_mb": 256,  # any document, on disk (it is read into memory whole)
    "markup_mb": 64,  # a .txt/.md/.html file; the XML parts of a .docx, unpacked
    "zip_ratio": 100,  # unpacked : packed, for any .docx part over 1 MB (Word's XML: ~10)
    "text_chars": 16_000_000,  # text taken out of one document (about 10,000 pages)
}


@dataclass
class Document:
    path: Path
    text: str


class Unreadable(Exception):
    """A document we cannot get text out of; the message says why and what to do."""


def _decode(data: bytes) -> str:
    """UTF-8 (with or without BOM) first; otherwise the detected encoding (GBK/GB18030…)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise Unreadable("not text in any encoding we recognise; save it as UTF-8")
    return str(best)


def read_text_file(path: Path) -> str:
    return _decode(path.read_bytes()).replace("\r\n", "\n").replace("\r", "\n")


def _table_rows(cells_by_row: list[list[str]]) -> list[str]:
    """A table as Markdown rows, one line per row (cell text kept on one line)."""
    return ["| " + " | ".join(" ".join(c.split()) for c in row) + " |" for row in cells_by_row]


def _check_docx_size(path: Path) -> None:
    """Refuse a .docx whose parts unpack beyond ``LIMITS``, from the sizes its zip directory
    declares (Python's zipfile never unpacks a part beyond its declared size, so they bind)."""
    try:
        with zipfile.ZipFile(path) as archive:
            parts = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise Unreadable(f"not a readable .docx ({type(err).__name__})") from None
    ratio = LIMITS["zip_ratio"]
    for part in parts:
        packed = max(part.compress_size, 1)
        if part.file_size > MB and part.file_size > ratio * packed:
            raise Unreadable(
                f"{part.filename} unpacks to {part.file_size / MB:,.0f} MB, "
                f"{part.file_size // packed:,}x its packed size (over the {ratio}x limit for "
                "a document: a zip bomb?)"
            )
    xml = sum(p.file_size for p in parts if p.filename.endswith((".xml", ".rels")))
    if xml > LIMITS["markup_mb"] * MB:
        raise Unreadable(
            f"its XML unpacks to {xml / MB:,.0f} MB, over the {LIMITS['markup_mb']} MB limit "
            "for a document; split it into smaller files"
        )


def read_docx(path: Path) -> str:
    import docx
    from docx.table import Table

    _check_docx_size(path)
    try:
        document = docx.Document(str(path))
    except Exception as err:  # python-docx raises zipfile/lxml/KeyError for broken files
        raise Unreadable(f"not a readable .docx ({type(err).__name__})") from None
    lines: list[str] = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            lines += _table_rows([[cell.text for cell in row.cells] for row in block.rows])
            continue
        style = (block.style.name if block.style is not None else "") or ""
        level = style.removeprefix("Heading ").strip()
        prefix = "#" * int(level) + " " if style.startswith("Heading") and level.isdigit() else ""
        lines.append(prefix + block.text)
    return "\n".join(lines)


def _too_much_text() -> Unreadable:
    return Unreadable(
        f"its text runs past {LIMITS['text_chars']:,} characters, the limit for a document; "
        "split it into smaller files"
    )


def _pdf_text(reader) -> str:
    """The pages' text, stopped once past the limit: a small PDF can draw one huge content
    stream on thousands of pages."""
    pages, total = [], 0
    for page in reader.pages:
        pages.append(page.extract_text() or "")
        total += len(pages[-1])
        if total > LIMITS["text_chars"]:
            raise _too_much_text()
    return "\n".join(pages)


def read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise FileNotDecryptedError("a password is needed")
        text = _pdf_text(reader)
    except Unreadable:
        raise
    except (FileNotDecryptedError, DependencyError):  # AES needs the cryptography package
        raise Unreadable("encrypted; save an unprotected copy") from None
    except Exception as err:  # a corrupt file can fail anywhere inside the parser
        if type(err).__name__ == "LimitReachedError":  # pypdf's own bound on one stream
            reason = "a stream in it unpacks past pypdf's limit on one stream (a bomb?)"
            raise Unreadable(reason) from None
        raise Unreadable(f"not a readable PDF ({type(err).__name__})") from None
    if not text.strip():
        raise Unreadable("no text layer (a scanned PDF?); run OCR on it first")
    return text


def read_html(path: Path) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_decode(path.read_bytes()), "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    for tag in soup.find_all([f"h{i}" for i in range(1, 7)]):
        tag.replace_with(f"\n{'#' * int(tag.name[1])} {tag.get_text(' ', strip=True)}\n")
    for table in soup.find_all("table"):
        rows = [
            [c.get_text(" ", strip=True) for c in tr.find_all(["td", "th"])]
            for tr in table.find_all("tr")
        ]
        table.replace_with("\n" + "\n".join(_table_rows(rows)) + "\n")
    text = soup.get_text("\n")
    return "\n".join(line.strip() for line in text.splitlines())


READERS: dict[str, Callable[[Path], str]] = {
    ".md": read_text_file,
    ".markdown": read_text_file,
    ".txt": read_text_file,
    ".docx": read_docx,
    ".pdf": read_pdf,
    ".html": read_html,
    ".htm": read_html,
}
_MODULES = {".docx": "docx", ".pdf": "pypdf", ".html": "bs4", ".htm": "bs4"}


def expand(paths: list[Path]) -> list[Path]:
    """The files to read: each file given, and every supported file under each folder."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in READERS)
            if not found:
                raise UserError(f"{path}: no {', '.join(READERS)} files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"document not found: {path}")
    return files


# Read and parsed as they are on disk, so their size is their markup's.
_MARKUP_TYPES = (".md", ".markdown", ".txt", ".html", ".htm")


def _check_file_size(path: Path, suffix: str) -> None:
    size = path.stat().st_size
    limit = LIMITS["markup_mb"] if suffix in _MARKUP_TYPES else LIMITS["file_mb"]
    if size > limit * MB:
        raise Unreadable(
            f"{size / MB:,.0f} MB, over the {limit} MB limit for a {suffix} document; "
            "split it into smaller files"
        )


def read_document(path: Path) -> Document:
    """One document's text, or :class:`Unreadable` saying why not."""
    suffix = path.suffix.lower()
    reader = READERS.get(suffix)
    if reader is None:
        raise Unreadable(f"unsupported type; use one of {', '.join(READERS)}")
    _check_file_size(path, suffix)
    module = _MODULES.get(suffix)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise Unreadable(_MISSING.format(suffix=suffix))
    text = reader(path)
    if len(text) > LIMITS["text_chars"]:
        raise _too_much_text()
    if not text.strip():
        raise Unreadable("no text in it")
    return Document(path, text)


def read_documents(paths: list[Path]) -> tuple[list[Document], list[str]]:
    """Every readable document, and one ``file: reason`` line per one that is not."""
    documents, problems = [], []
    for path in expand(paths):
        try:
            documents.append(read_document(path))
        except Unreadable as err:
            problems.append(f"{path}: {err}")
    if not documents:
        raise UserError("no readable document: " + "; ".join(problems))
    return documents, problems
