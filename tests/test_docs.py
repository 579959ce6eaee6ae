"""The README and docs/ cannot drift from the code.

Every ``qwen-mlx …`` command line (in shell blocks and inline code) names a real command
and only its options; every other ``--flag`` is an option of some command; every
``section.key`` and every key of a YAML block is in the config schema (the dataclasses of
:mod:`qwen_mlx.config`); every command and config key is documented somewhere; relative links
(and their ``#anchors``) point at files and headings that exist. Only the click tree and the
dataclasses are read: no model, no backend.

A YAML block that is not a config fragment says so on its first line, e.g.
``# prompts.yaml (not config.yaml)``. A command of another program (``ollama``, ``pip``,
``curl`` …) is not checked; in ``torchrun … -m qwen_mlx train …`` the part after
``-m qwen_mlx`` is.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from repo_helpers import REPO_ROOT

from qwen_mlx.cli import cli
from qwen_mlx.config import Config

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
HELP = {"-h", "--help"}
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SEPARATORS = {"&&", "||", "|", ";"}
# A file name such as data.py or chat.jsonl is not a config key.
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "yml", "md", "html", "png", "csv", "txt", "gguf"}


# ------------------------------------------------------------------ the code's side


def _walk(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple, click.Command]]:
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _walk(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS: dict[tuple[str, ...], click.Command] = dict(_walk(cli))


def _options(command: click.Command) -> set[str]:
    names = set(HELP)
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


ALL_FLAGS = {flag for command in COMMANDS.values() for flag in _options(command)}
SECTIONS = {
    section.name: {f.name for f in dataclasses.fields(section.default_factory())}
    for section in dataclasses.fields(Config)
}
KEY = re.compile(
    rf"(?<![\w./-])({'|'.join(SECTIONS)})\.([A-Za-z_][\w]*)(?![\w/-])",
)


# ------------------------------------------------------------------ the docs' side


@dataclasses.dataclass
class Doc:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return str(self.path.relative_to(REPO_ROOT))

    def blocks(self) -> list[tuple[str, str]]:
        """(language, body) of each fenced code block."""
        return [(lang.lower(), body) for lang, body in FENCE.findall(self.text)]

    def outside_blocks(self) -> str:
        return FENCE.sub("", self.text)

    def spans(self) -> list[str]:
        """Inline code, whitespace collapsed; ``\\|`` (a pipe inside a table) unescaped."""
        return [
            " ".join(span.replace("\\|", "|").split())
            for span in SPAN.findall(self.outside_blocks())
        ]

    def prose(self) -> str:
        return SPAN.sub(" ", self.outside_blocks())

    def shell_lines(self) -> list[str]:
        """Each command of the shell blocks, continuation lines joined."""
        lines = []
        for lang, body in self.blocks():
            if lang in SHELL_BLOCKS:
                lines += [ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip()]
        return lines


def _docs() -> list[Doc]:
    return [Doc(path, path.read_text(encoding="utf-8")) for path in DOC_FILES]


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose-like code: split plainly
        return line.split("#")[0].split()


def _segments(tokens: list[str]) -> Iterator[list[str]]:
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token in SEPARATORS:
            if segment:
                yield segment
            segment = []
        else:
            segment.append(token)


def _invocation(segment: list[str]) -> list[str] | None:
    """The arguments after ``qwen-mlx`` (or ``-m qwen_mlx``), or None for another program."""
    for i, token in enumerate(segment):
        if token == "qwen-mlx":
            return segment[i + 1 :]
        if token == "-m" and segment[i + 1 : i + 2] == ["qwen_mlx"]:
            return segment[i + 2 :]
    return None


def _flag(token: str) -> str | None:
    """``--quant`` from ``--quant``, ``[--quant``, ``--set=K=V`` …; None if not an option."""
    token = token.strip("[](),.;:")
    if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token):
        return token.split("=", 1)[0]
    return None


def check_invocation(args: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The command path ``args`` names and what is wrong with it (unknown command/option)."""
    path: tuple[str, ...] = ()
    problems = []
    rest = list(args)
    while isinstance(COMMANDS[path], click.Group) and rest and not rest[0].startswith("-"):
        word = rest.pop(0)
        if (*path, word) not in COMMANDS:
            problems.append(f"unknown command `qwen-mlx {' '.join((*path, word))}`")
            return path, problems
        path = (*path, word)
    known = _options(COMMANDS[path])
    for token in rest:
        flag = _flag(token)
        if flag and flag not in known:
            problems.append(f"`qwen-mlx {' '.join(path)}` has no option {flag}")
    return path, problems


def check_text(doc: Doc) -> tuple[list[str], set[tuple[str, ...]]]:
    """The problems in one page's commands, flags and config keys, and the commands it uses."""
    problems: list[str] = []
    used: set[tuple[str, ...]] = set()
    bare: list[str] = []  # text whose flags must be an option of some command
    for line in [*doc.shell_lines(), *doc.spans()]:
        tokens = _tokens(line)
        if tokens and _flag(tokens[0]):  # `--quant q8_0`, `--preset`: a bare option
            bare.append(line)
            continue
        for segment in _segments(tokens):
            args = _invocation(segment)
            if args is None:
                continue  # another program's command, or not a command at all
            path, found = check_invocation(args)
            used.add(path)
            problems += [f"{doc.name}: {p} (in `{line}`)" for p in found]
    bare.append(doc.prose())
    for text in bare:
        for flag in FLAG.findall(text):
            if flag not in ALL_FLAGS:
                problems.append(f"{doc.name}: no command has an option {flag}")
    problems += [f"{doc.name}: {p}" for p in config_key_problems(doc)]
    return problems, used


def config_key_problems(doc: Doc) -> list[str]:
    problems = []
    for section, key in KEY.findall(doc.text):
        if key not in FILE_SUFFIXES and key not in SECTIONS[section]:
            problems.append(f"config key {section}.{key} is not in qwen_mlx/config.py")
    for lang, body in doc.blocks():
        if lang in ("yaml", "yml") and "not config" not in body.split("\n", 1)[0]:
            problems += yaml_problems(body)
    return problems


def yaml_problems(body: str) -> list[str]:
    raw = yaml.safe_load(body) or {}
    if not isinstance(raw, dict):
        return ["a YAML block that is not a mapping (mark it `# … (not config.yaml)`)"]
    problems = []
    for section, keys in raw.items():
        if section not in SECTIONS:
            problems.append(f"YAML section {section}: is not in qwen_mlx/config.py")
            continue
        for key in keys or {}:
            if key not in SECTIONS[section]:
                problems.append(f"YAML key {section}.{key} is not in qwen_mlx/config.py")
    return problems


def documented_keys(docs: list[Doc]) -> set[str]:
    keys = {f"{s}.{k}" for doc in docs for s, k in KEY.findall(doc.text)}
    for doc in docs:
        for lang, body in doc.blocks():
            if lang in ("yaml", "yml") and "not config" not in body.split("\n", 1)[0]:
                raw = yaml.safe_load(body) or {}
                keys |= {f"{s}.{k}" for s, section in raw.items() for k in (section or {})}
    return keys


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def link_problems(doc: Doc) -> list[str]:
    problems = []
    for target in LINK.findall(doc.outside_blocks()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.path.parent / file_part).resolve() if file_part else doc.path
        if not path.exists():
            problems.append(f"{doc.name}: link to {target}: {file_part} does not exist")
            continue
        if anchor and path.suffix == ".md":
            headings = {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text("utf-8")))}
            if anchor not in headings:
                problems.append(f"{doc.name}: link to {target}: no heading #{anchor}")
    return problems


# ------------------------------------------------------------------ the tests


def test_the_docs_exist_and_the_readme_opens_with_make_demo_and_make_test():
    assert len(DOC_FILES) >= 9, DOC_FILES
    readme = _docs()[0]
    first_block = readme.blocks()[0][1].splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: d.name)
def test_commands_flags_and_config_keys_exist(doc):
    problems, _ = check_text(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: d.name)
def test_relative_links_point_at_files_and_headings(doc):
    problems = link_problems(doc)
    assert not problems, "\n".join(problems)


def test_every_command_and_config_key_is_documented():
    docs = _docs()
    used = set().union(*(check_text(doc)[1] for doc in docs))
    leaves = {p for p, c in COMMANDS.items() if not isinstance(c, click.Group)}
    assert used, "no qwen-mlx command found in the docs: the parser is broken"
    missing = sorted(" ".join(p) for p in leaves - used)
    assert not missing, f"commands no page shows: {missing}"
    schema = {f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys}
    undocumented = sorted(schema - documented_keys(docs))
    assert not undocumented, f"config keys no page names (docs/training.md): {undocumented}"


def _mentioned(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def test_every_option_is_documented():
    """Each option appears somewhere under one of its names (``-o`` or ``--out``)."""
    text = "\n".join(doc.text for doc in _docs())
    missing = sorted(
        f"qwen-mlx {' '.join(path)} {param.opts[-1]}".replace("  ", " ")
        for path, command in COMMANDS.items()
        for param in command.params
        if isinstance(param, click.Option)
        and not any(_mentioned(name, text) for name in param.opts + param.secondary_opts)
    )
    assert not missing, f"options no page mentions: {missing}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```bash\nqwen-mlx train --made-up-flag 1\n```", "has no option --made-up-flag"),
        ("`qwen-mlx export RUN -o x.gguf --qaunt q8_0`", "has no option --qaunt"),
        ("`qwen-mlx trian --preset quick`", "unknown command `qwen-mlx trian`"),
        ("`qwen-mlx data prepair x.jsonl`", "unknown command `qwen-mlx data prepair`"),
        ("Pass `--made-up` to it.", "no command has an option --made-up"),
        ("Or just --made-up in prose.", "no command has an option --made-up"),
        ("`torchrun --nproc_per_node 2 -m qwen_mlx train --bogus`", "has no option --bogus"),
        ("Set `training.num_epoch` to 1.", "training.num_epoch is not in"),
        ("`--set lora.rnak=8`", "lora.rnak is not in"),
        ("```yaml\ntraining:\n  epochs: 3\n```", "training.epochs is not in"),
        ("```yaml\ntrainig:\n  num_epochs: 3\n```", "section trainig: is not in"),
    ],
)
def test_a_made_up_name_is_caught(tmp_path, text, expected):
    problems, _ = check_text(Doc(REPO_ROOT / "docs" / "planted.md", text))
    assert any(expected in p for p in problems), problems


def test_real_names_and_other_programs_pass():
    text = (
        "```bash\nqwen-mlx data distill d/ -o out --plan  # a comment --not-a-flag\n"
        "ollama create x -f x.Modelfile && qwen-mlx chat --gguf x.gguf\n"
        "pip install -e '.[mlx]'\n```\n"
        "`qwen-mlx --version`, `llama-cli -m b.gguf --lora a.gguf`, `--quant q8_0`, "
        "`data.py`, `training.max_steps=0`, `qwen_mlx/chat.py`"
    )
    problems, used = check_text(Doc(REPO_ROOT / "docs" / "planted.md", text))
    assert not problems, problems
    assert used == {("data", "distill"), ("chat",), ()}


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    doc = Doc(REPO_ROOT / "docs" / "planted.md", "[a](nope.md) [b](training.md#no-such-heading)")
    problems = link_problems(doc)
    assert len(problems) == 2, problems
    assert link_problems(Doc(doc.path, "[c](training.md#presets) [d](../README.md)")) == []
