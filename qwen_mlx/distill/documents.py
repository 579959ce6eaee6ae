"""Read rule documents (.md, .txt, .docx, .pdf, .html) into plain text with headings.

Headings come out as Markdown ``#`` lines and tables as ``| a | b |`` rows, whatever the
source format, so the chunker has one kind of structure to look at. A file that cannot be
read (no text layer, encrypted, corrupt) is one problem line naming it; the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen_mlx.errors import UserError

_MISSING = "pip install 'qwen-mlx[docs]' to read {suffix} files"


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


def read_docx(path: Path) -> str:
    import docx
    from docx.table import Table

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


def read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise FileNotDecryptedError("a password is needed")
        text = "\n".join(page.extract_text() or "" for page in reader.pages)
    except (FileNotDecryptedError, DependencyError):  # AES needs the cryptography package
        raise Unreadable("encrypted; save an unprotected copy") from None
    except Exception as err:  # a corrupt file can fail anywhere inside the parser
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


def read_document(path: Path) -> Document:
    """One document's text, or :class:`Unreadable` saying why not."""
    suffix = path.suffix.lower()
    reader = READERS.get(suffix)
    if reader is None:
        raise Unreadable(f"unsupported type; use one of {', '.join(READERS)}")
    module = _MODULES.get(suffix)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise Unreadable(_MISSING.format(suffix=suffix))
    text = reader(path)
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
