"""The tokenizer half of a GGUF: byte-level BPE vocabulary, merges, special ids, template.

llama.cpp re-implements the tokenizer from these keys (for Qwen2: model "gpt2",
pre-tokenizer "qwen2", both named by the model's family), so they must reproduce the Hugging
Face tokenizer exactly: token strings stay in byte-level form, special tokens are CONTROL so
``<|im_end|>`` in a prompt is one token, and the list is padded to the embedding's row
count with unused ``[PAD<i>]`` entries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.families import Family

# An added token that looks like a control token even where "special" is false.
_LOOKS_SPECIAL = re.compile(r"<\|.*\|>|<｜.*｜>|<pad>|<mask>|<unused.*>")
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")


@dataclass
class GGUFVocab:
    """Everything the GGUF tokenizer keys need, read from a model folder."""

    family: Family  # names llama.cpp's tokenizer model and pre-tokenizer
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    chat_template: str | list | None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _merge_string(merge: str | list[str]) -> str:
    # transformers ≥ 4.45 writes [left, right] pairs; GGUF keeps the older "left right" form,
    # where a literal space inside a part would be ambiguous, hence Ġ (byte-level space).
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", "\u0120") for part in merge)


def _vocab_and_added(model_dir: Path) -> tuple[dict[str, int], list[dict], list[str], dict]:
    """(vocab, added tokens, merges, tokenizer.json spec); vocab.json + merges.txt also work."""
    spec = _read_json(model_dir / "tokenizer.json")
    if spec:
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"{model_dir}: tokenizer is {model.get('type')}, expected BPE")
        merges = [_merge_string(m) for m in model.get("merges", [])]
        return model["vocab"], spec.get("added_tokens", []), merges, spec
    vocab = _read_json(model_dir / "vocab.json")
    merges_file = model_dir / "merges.txt"
    if not vocab or not merges_file.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json (or vocab.json + merges.txt)")
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
    added = [{"id": int(i), **tok} for i, tok in decoder.items()]
    return vocab, added, merges, {}


def _token_table(vocab: dict, added: list[dict], n_vocab: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    by_id: dict[int, tuple[str, int]] = {i: (tok, TokenType.NORMAL) for tok, i in vocab.items()}
    for tok in added:
        special = tok.get("special") or _LOOKS_SPECIAL.fullmatch(tok["content"])
        kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
        by_id[tok["id"]] = (tok["content"], kind)
    if max(by_id) >= n_vocab:
        raise UserError(
            f"the tokenizer has token id {max(by_id)} but config.json vocab_size is {n_vocab}"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def _special_ids(model_dir: Path, added: list[dict], config: dict, n_vocab: int) -> dict:
    """Special ids the way llama.cpp's converter finds them: tokenizer_config token strings
    (matched among added tokens), then config.json ``<type>_token_id`` integers."""
    tok_config = _read_json(model_dir / "tokenizer_config.json")
    by_content = {tok["content"]: tok["id"] for tok in added}
    ids = {}
    for kind in _SPECIAL_TYPES:
        value = tok_config.get(f"{kind}_token")
        content = value.get("content") if isinstance(value, dict) else value
        token_id = by_content.get(content) if content else None
        if token_id is None:
            candidate = config.get(f"{kind}_token_id")
            valid = isinstance(candidate, int) and not isinstance(candidate, bool)
            token_id = candidate if valid and candidate < n_vocab else None
        if token_id is not None:
            ids[kind] = token_id
    return ids


def _chat_template(model_dir: Path) -> str | list | None:
    template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if template:
        return template
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return _read_json(model_dir / "chat_template.json").get("chat_template")


def _split_patterns(node: object) -> list[str]:
    """Every ``Split`` regex inside a tokenizer.json pre_tokenizer (nested in Sequences)."""
    if isinstance(node, list):
        return [p for item in node for p in _split_patterns(item)]
    if not isinstance(node, dict):
        return []
    own = [node["pattern"]["Regex"]] if isinstance(node.get("pattern"), dict) else []
    return own + _split_patterns(node.get("pretokenizers"))


def _pre_tokenizer_note(spec: dict, family: Family) -> list[str]:
    """A warning when the pre-tokenizer is not the family's, which its GGUF name (``qwen2``)
    would then misdescribe."""
    if not spec or _split_patterns(spec.get("pre_tokenizer")) == [family.split_pattern]:
        return []
    return [
        f"the tokenizer's pre-tokenizer is not {family.gguf_pre}'s; "
        "llama.cpp may split text differently"
    ]


def _thinking_default(template: str | list | None, family: Family, thinking: bool):
    """The chat template, made to render prompts as the model was tuned where the caller
    does not say: llama.cpp, llama-server and LM Studio pass no ``enable_thinking``, and
    Qwen3's template then opens no empty think block (thinking on)."""
    if not family.thinks or not isinstance(template, str):
        return template
    default = "true" if thinking else "false"
    return (
        f"{{%- set enable_thinking = enable_thinking if enable_thinking is defined "
        f"else {default} -%}}" + template
    )


def read_vocab(model_dir: Path, config: dict, family: Family, thinking: bool = False) -> GGUFVocab:
    """The GGUF vocabulary of ``model_dir``, padded to config.json's ``vocab_size``;
    ``thinking``: the model was tuned with chat.enable_thinking."""
    vocab, added, merges, spec = _vocab_and_added(model_dir)
    if not merges:
        raise UserError(f"{model_dir}: the tokenizer has no BPE merges")
    n_vocab = int(config["vocab_size"])
    tokens, types = _token_table(vocab, added, n_vocab)
    special = _special_ids(model_dir, added, config, n_vocab)
    template = _thinking_default(_chat_template(model_dir), family, thinking)
    notes = _pre_tokenizer_note(spec, family)
    return GGUFVocab(family, tokens, types, merges, special, template, notes)


def add_vocab(writer, vocab: GGUFVocab) -> None:
    """Write the tokenizer keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.family.gguf_tokenizer)
    writer.add_tokenizer_pre(vocab.family.gguf_pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    # Qwen prepends nothing: add_bos true would put <|endoftext|> before every prompt.
    writer.add_add_bos_token(vocab.family.adds_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def default_chat_template(model_dir: Path) -> str | None:
    """The model's chat template as one string (its "default" one, if it names several)."""
    template = _chat_template(model_dir)
    if isinstance(template, list):
        return {t.get("name"): t.get("template") for t in template}.get("default")
    return template
