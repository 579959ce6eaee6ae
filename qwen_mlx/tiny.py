"""Build a tiny, offline Qwen2.5-Instruct (or Qwen3) look-alike model folder.

The folder has the same files, tensor names, config keys, tokenizer structure and chat
template as a downloaded Qwen2.5 model (0.5B/1.5B/3B: tied embeddings, bf16 weights), only
with a few hundred thousand random parameters and a small byte-level BPE vocabulary trained
on the user's data. Tests and demos run every backend, ``fuse`` and ``export`` on it through
the same loading code a real model goes through, without network or a big download.

The family facts (tensor names and shapes, special tokens, split pattern, chat template)
come from :mod:`qwen_mlx.families` (``arch="qwen3"``: q/k norms, no q/k/v bias, a
``head_dim`` other than hidden/heads, ``<think>`` tokens and Qwen3's own chat template).
Only numpy, tokenizers and qwen-mlx's own safetensors writer are used, so building it needs
neither torch nor mlx and takes about a second.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from qwen_mlx.errors import UserError
from qwen_mlx.families import QWEN2, Family, by_name
from qwen_mlx.fsutil import write_json
from qwen_mlx.outputs import output_dir
from qwen_mlx.tensor_io import save_tensors

# safetensors dtype code of each dtype the builder writes.
_DTYPES = {"bfloat16": "BF16", "float32": "F32"}
_VOCAB_MULTIPLE = 64

# Mixed Chinese/English/digits/punctuation so the vocabulary covers what tests and demos type
# even without a data file; the role names and default system prompt tokenize compactly.
_BUILTIN_CORPUS = (
    QWEN2.default_system_prompt,
    "system\nuser\nassistant\ntool\n",
    "报销细则：教职工因公出差发生的交通费、住宿费和伙食补助费，凭有效票据按规定报销。",
    "差旅费报销须在出差结束后30日内办理，逾期需由部门负责人签字说明原因。",
    "住宿费标准：一般人员每人每天不超过500元，校级领导不超过800元，超出部分自理。",
    "市内交通费按实际发生额报销，出租车票须注明起止地点和事由。",
    "会议费、培训费应事先列入预算，并提供会议通知、签到表和费用明细。",
    "购买办公用品单张发票金额超过1000元的，须附清单并经资产管理部门验收。",
    "问：出差可以乘坐飞机吗？答：经批准后可乘坐经济舱，需提供登机牌和行程单。",
    "增值税专用发票、电子普通发票均可作为报销凭证；发票抬头须为学校全称，税号准确。",
    "科研经费报销需项目负责人审核签字，财务处复核后支付到个人银行卡或公务卡。",
    "如有疑问，请联系财务处，电话：010-12345678，邮箱 finance@example.edu.cn。",
    "你好！请问有什么可以帮你？我是一个中文助手，可以回答关于报销流程的问题。",
    "一二三四五六七八九十百千万亿 年月日 时分秒 元角分 第一条 第二条 第三条 附则",
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "Expense reports must be filed within 30 days; receipts over $100 need a manager's approval.",
    "Travel: economy class only. Hotels up to 500 CNY per night. Meals are reimbursed at cost.",
    "I'm sure it's fine, they'll say we've done what we'd planned. Don't worry, you're right.",
    "0 1 2 3 4 5 6 7 8 9 10 42 100 2024-06-30 3.14159 1,234.50 99% #7 @home",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3\n",
    '{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}',
    "<tool_call>\n</tool_call>\n<tool_response>\n</tool_response>\n<tools>\n</tools>\n",
    "Q: What is the capital of France? A: Paris. Q: 2 + 2 = ? A: 4.",
    "标点符号：，。、；：？！“”‘’（）《》【】——…… ,.;:?!\"'()[]{}<>-_/\\|+=*&^%$~`",
)


def build_tiny_model(
    out_dir: str | os.PathLike,
    data_file: str | os.PathLike | None = None,
    *,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: str = "bfloat16",
    force: bool = False,
    arch: str | Family = "qwen2",
) -> Path:
    """Write a complete tiny Qwen2.5-Instruct-style model folder to ``out_dir``; return it.

    ``arch="qwen3"`` writes a Qwen3 instead, with ``head_dim`` twice hidden/heads so code that
    assumes hidden/heads is caught.

    ``vocab_size`` is the most tokens the tokenizer gets (BPE vocabulary plus the 3 special
    tokens; a small corpus runs out of merges sooner). config.json's ``vocab_size`` pads the
    real size up to a multiple of 64, leaving unused embedding rows as Qwen does.
    The same arguments always give byte-identical weights and tokenizer files.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    family = arch if isinstance(arch, Family) else by_name(arch, option="--arch")
    texts = read_corpus(data_file) if data_file is not None else []
    tokenizer = train_tokenizer([*texts, *_BUILTIN_CORPUS], vocab_size, family)
    ids = {tok: tokenizer.token_to_id(tok) for tok in _added(family)}
    dims = {
        "vocab_size": padded_vocab_size(tokenizer.get_vocab_size(with_added_tokens=True)),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
    }
    if family.tiny.head_dim_factor:
        dims["head_dim"] = family.tiny.head_dim_factor * hidden_size // num_heads
    weights = init_weights(np.random.default_rng(seed), dims, family)
    out_dir = Path(out_dir)
    with output_dir(out_dir, "tiny-model", force) as tmp:
        save_tensors(tmp / "model.safetensors", weights, _DTYPES[dtype])
        tokenizer.save(str(tmp / "tokenizer.json"), pretty=True)
        tokenizer.model.save(str(tmp))  # vocab.json + merges.txt, as Qwen folders ship them
        write_json(tmp / "config.json", _model_config(family, dims, ids, dtype))
        write_json(tmp / "generation_config.json", _generation_config(family, ids))
        write_json(tmp / "tokenizer_config.json", _tokenizer_config(family, ids))
    return out_dir


def _added(family: Family) -> tuple[str, ...]:
    """The added tokens, control tokens first, in the order their ids follow the BPE ones."""
    return (*family.special_tokens, *family.text_tokens)


# ---------------------------------------------------------------- data -> tokenizer


def read_corpus(path: str | os.PathLike) -> list[str]:
    """Every string value in a JSONL file (any record shape), in file order.

    Strings nested in lists and objects count too, so seed ``history`` pairs, chat
    ``messages`` and sharegpt ``conversations`` all feed the tokenizer.
    """
    path = Path(path)
    fix = "give a UTF-8 JSONL file (one JSON object per line) or leave out --data"
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"data file {path} is not UTF-8 text; {fix}") from None
    except OSError as err:
        raise UserError(f"cannot read data file {path} ({err.strerror}); {fix}") from None
    texts: list[str] = []
    # split("\n"), not splitlines(): U+2028 may sit unescaped inside a JSON string.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {lineno} is not JSON ({err.msg}); {fix}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {lineno} is not a JSON object; {fix}")
        texts.extend(_strings(record))
    if not texts:
        raise UserError(f"data file {path} has no text in it; {fix}")
    return texts


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def train_tokenizer(texts: list[str], vocab_size: int = 2048, family: Family = QWEN2) -> Tokenizer:
    """Train a byte-level BPE with Qwen2's tokenizer.json structure and the family's added
    tokens (Qwen3 also has ``<think>`` and ``</think>``, added but not special)."""
    added = _added(family)
    if vocab_size < 256 + len(added):
        raise ValueError("vocab_size must leave room for the 256 byte tokens and the added ones")
    bpe = {"continuing_subword_prefix": "", "end_of_word_suffix": ""}  # Qwen's values
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, **bpe))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family.split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        # The full byte alphabet means any text, even unseen scripts, still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
        **bpe,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    tokenizer = _with_qwen_decoder(tokenizer)
    tokenizer.add_special_tokens([_special(tok) for tok in family.special_tokens])
    tokenizer.add_tokens(
        [AddedToken(tok, special=False, normalized=False) for tok in family.text_tokens]
    )
    _check_tokenizer(tokenizer, added)
    return tokenizer


def _with_qwen_decoder(tokenizer: Tokenizer) -> Tokenizer:
    # decoders.ByteLevel() ignores its options and saves them as true; Qwen's file has them
    # false. They do not change decoding, but the folder should read like a real download.
    spec = json.loads(tokenizer.to_str())
    spec["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return Tokenizer.from_str(json.dumps(spec))


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _check_tokenizer(tokenizer: Tokenizer, added: tuple[str, ...]) -> None:
    # A broken vocabulary would only show up later as garbled chat output; fail here instead.
    sample = "报销细则 第3条：差旅费 1,234.50 元 (Travel), ok?\n"
    ids = tokenizer.encode(sample, add_special_tokens=False).ids
    if tokenizer.decode(ids, skip_special_tokens=False) != sample:
        raise RuntimeError("tiny tokenizer does not round-trip text; this is a qwen-mlx bug")
    for tok in added:
        if len(tokenizer.encode(tok).ids) != 1:
            raise RuntimeError(f"tiny tokenizer splits {tok}; this is a qwen-mlx bug")


def padded_vocab_size(n_tokens: int) -> int:
    """Next multiple of 64 strictly above ``n_tokens``: Qwen leaves unused embedding rows."""
    return (n_tokens // _VOCAB_MULTIPLE + 1) * _VOCAB_MULTIPLE


# ---------------------------------------------------------------- weights


def init_weights(
    rng: np.random.Generator, config: dict[str, int], family: Family = QWEN2
) -> dict[str, np.ndarray]:
    """Random float32 tensors under the family's names and shapes (tied embeddings).

    Biases and norm weights are far from 0 and 1 so a converter that drops or misplaces
    them (GGUF export, fuse) changes the logits and a test notices. Matrices are scaled by
    1/sqrt(fan-in) and embeddings have std 0.2, like a trained network's signal scale rather
    than the usual 0.02 init: with 0.02 the frozen, tied output embedding keeps every logit
    near zero and LoRA cannot measurably learn in the few dozen steps tests can afford.
    """
    return {
        name: _initial(rng, name, shape)
        for name, shape in family.tensor_shapes({"tie_word_embeddings": True, **config}).items()
    }


def _initial(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("embed_tokens.weight"):
        return _normal(rng, shape, std=0.2)
    if name.endswith("norm.weight"):
        return _normal(rng, shape, std=0.1, mean=1.0)
    if name.endswith(".bias"):
        return _normal(rng, shape, std=0.1)
    return _normal(rng, shape, std=shape[1] ** -0.5)


def _normal(rng: np.random.Generator, shape: tuple, std: float, mean: float = 0.0):
    return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


# ---------------------------------------------------------------- json files


def _model_config(family: Family, dims: dict[str, int], ids: dict[str, int], dtype: str) -> dict:
    config = {
        "architectures": list(family.architectures),
        "attention_dropout": 0.0,
        "bos_token_id": ids[family.document_end],
        "eos_token_id": ids[family.turn_end],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": dims["num_hidden_layers"],
        "model_type": family.name,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "transformers_version": family.tiny.transformers_version,
        "use_cache": True,
        "use_sliding_window": False,
        **family.tiny.config,
        **dims,
    }
    return dict(sorted(config.items()))  # Qwen's config.json lists its keys alphabetically


def _generation_config(family: Family, ids: dict[str, int]) -> dict:
    return {
        "bos_token_id": ids[family.document_end],
        "pad_token_id": ids[family.document_end],
        "do_sample": True,
        "eos_token_id": [ids[token] for token in family.stop_tokens],
        **family.tiny.sampling,
        "transformers_version": family.tiny.transformers_version,
    }


def _tokenizer_config(family: Family, ids: dict[str, int]) -> dict:
    decoder = {
        str(ids[tok]): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": tok in family.special_tokens,
        }
        for tok in _added(family)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [family.turn_start, family.turn_end],
        "bos_token": None,
        "chat_template": family.chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": family.turn_end,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": family.document_end,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
