"""Do a model folder's tokenizer and chat template work with its model? (for ``check``)

Each file can be fine on its own and the folder still unusable: a tokenizer with ids past the
embedding's rows (an index error at the first batch holding one), a tokenizer without the
family's control tokens (without ``<|im_end|>`` no reply ever ends), no chat template, or one
that fails in transformers' sandbox (training formats every record with it). The tokenizer is
loaded the way training loads it (transformers), never the weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qwen_mlx.families import Family
from qwen_mlx.model_files import Finding, Shapes, download_hint

# A conversation the template must render, as every chat record is rendered for training.
SAMPLE = [
    {"role": "system", "content": "You check templates."},
    {"role": "user", "content": "Is this template usable?"},
    {"role": "assistant", "content": "Yes, it renders."},
]


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def load_hf_tokenizer(model_dir: Path) -> Any:
    """The tokenizer as training loads it (``qwen_mlx.tokens.load_tokenizer`` without its
    refusals, which the findings here report with their fixes)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    # Its warnings about the folder (ids outside the vocabulary …) repeat what the findings
    # say, in its words; errors still show.
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    finally:
        logging.set_verbosity(before)


def _token_ids(tokenizer: Any, model_dir: Path) -> int:
    """How many ids the tokenizer can produce: as transformers loads it (training), and as
    tokenizer.json holds it (GGUF export reads that file), whichever is more."""
    from tokenizers import Tokenizer

    ids = max(tokenizer.get_vocab().values(), default=-1) + 1
    if (model_dir / "tokenizer.json").is_file():
        raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        ids = max(ids, max(raw.get_vocab(with_added_tokens=True).values(), default=-1) + 1)
    return ids


def check_vocabulary(
    tokenizer: Any, model_dir: Path, config: dict[str, Any], shapes: Shapes
) -> Finding:
    """Token ids must index rows of the embedding, and config.json must say how many."""
    size = config["vocab_size"]
    rows = next((s[0] for n, s in shapes.items() if n.endswith("embed_tokens.weight") and s), None)
    if rows is not None and rows != size:
        detail = f"config.json says vocab_size {size}, the embedding has {rows} rows"
        fix = f'set "vocab_size": {rows} in config.json (or re-download it)'
        return Finding("fail", "vocabulary: vocab_size does not match the weights", detail, fix)
    ids = _token_ids(tokenizer, model_dir)
    if ids > size:
        detail = f"the tokenizer has ids up to {ids - 1}, the model only {size} embedding rows"
        fix = "use the tokenizer files that came with these weights (the same hub repo)"
        return Finding("fail", "vocabulary: tokenizer larger than the model", detail, fix)
    return Finding("ok", "vocabulary", f"{ids} token ids, {size} embedding rows")


def check_control_tokens(tokenizer: Any, family: Family) -> Finding:
    """The family's control tokens each exist as one special token: training ends every
    reply with the turn's end, and generation stops on it."""
    from qwen_mlx.chat_template import hf_controls

    vocab, controls = tokenizer.get_vocab(), set(hf_controls(tokenizer))
    for token in family.special_tokens:
        if token not in vocab:
            problem = f"no {token} token"
        elif token not in controls:
            problem = f"{token} is not a special (control) token"
        else:
            continue
        detail = f"{family.name} chat turns end with {family.turn_end}, and replies stop on it"
        fix = "use the tokenizer files that came with the model (the same hub repo)"
        return Finding("fail", f"tokenizer: {problem}", detail, fix)
    return Finding("ok", "control tokens", ", ".join(family.special_tokens))


def _template_fix(model_dir: Path, family: Family) -> str:
    source = family.chat_template_path()
    return (
        f"use the model's own tokenizer_config.json (`{download_hint(model_dir)}`), or copy "
        f"qwen-mlx's {family.name} template: cp {source} {model_dir / 'chat_template.jinja'}"
    )


def check_chat_template(tokenizer: Any, model_dir: Path, family: Family) -> Finding:
    """The chat template renders a conversation in transformers' sandbox, and ends the
    assistant's turn with the family's turn end (the token a tuned model learns to stop on)."""
    from qwen_mlx.chat_template import hf_render

    fix = _template_fix(model_dir, family)
    if not tokenizer.chat_template:
        detail = "tokenizer_config.json has no chat_template; training formats records with it"
        return Finding("fail", "chat template missing", detail, fix)
    try:
        whole = hf_render(tokenizer, SAMPLE)
        hf_render(tokenizer, SAMPLE[:2], generation_prompt=True)
    # A template is a program: it can fail in any way (syntax, sandbox, raise_exception).
    except Exception as err:
        return Finding("fail", "chat template fails to render", _first_line(err), fix)
    answer = re.escape(SAMPLE[-1]["content"]) + r"\s*" + re.escape(family.turn_end)
    if not re.search(answer, whole):
        detail = f"an assistant turn does not end with {family.turn_end}: replies would not stop"
        return Finding("fail", "chat template does not close turns", detail, fix)
    return Finding("ok", "chat template", "renders a conversation")


def check_tokenizer_fit(
    model_dir: Path, config: dict[str, Any], family: Family, shapes: Shapes
) -> list[Finding]:
    """Vocabulary, control tokens and chat template, from the tokenizer training loads."""
    try:
        tokenizer = load_hf_tokenizer(model_dir)
    # transformers raises many types for a folder it cannot load (OSError, ValueError, …).
    except Exception as err:
        fix = f"re-run `{download_hint(model_dir)}` (it resumes)"
        return [Finding("fail", "tokenizer cannot be loaded", _first_line(err), fix)]
    findings = [check_control_tokens(tokenizer, family)]
    findings.append(check_chat_template(tokenizer, model_dir, family))
    findings.append(check_vocabulary(tokenizer, model_dir, config, shapes))
    return findings
