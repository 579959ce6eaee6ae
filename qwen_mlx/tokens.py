"""Normalized records → token ids + loss mask, and packing of samples into rows.

Chat records go through :func:`qwen_mlx.conversation.encode_chat` (the model's own chat
template, the loss on the assistant turns), plain text records end with the family's
end-of-text token. Message text is encoded as text even where it spells a control token such
as ``<|im_end|>`` (see :mod:`qwen_mlx.chat_template`, shared with eval, chat and serve);
records that do are counted in the report, as are truncated ones.

Packing puts several samples in one row of ``max_seq_length`` tokens. Each row carries
``segment_ids`` (1, 2, … per sample, 0 for padding) and ``position_ids`` restarting at 0 for
every sample, so backends can keep attention inside each sample.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen_mlx.chat_template import hf_controls, hf_text, renders_reasoning, spells_control
from qwen_mlx.conversation import Sample, encode_chat
from qwen_mlx.errors import UserError
from qwen_mlx.families import tokenizer_family


@dataclass
class EncodeReport:
    encoded: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to learn after truncation
    windowed: int = 0  # long text records cut into max_seq_length windows (not truncated)
    control_text: int = 0  # records whose text spells a control token (encoded as text)
    unwritten_reasoning: int = 0  # records whose reasoning the template does not write (Qwen2)
    lengths: list[int] = field(default_factory=list)  # before truncation

    def warnings(self, max_seq_length: int) -> list[str]:
        out = []
        if self.truncated:
            out.append(
                f"{self.truncated} of {self.encoded} samples are longer than max_seq_length="
                f"{max_seq_length} and were truncated; raise training.max_seq_length to keep them"
            )
        if self.control_text:
            out.append(
                f"{self.control_text} of {self.encoded} records contain control-token text such "
                "as <|im_end|>; it is trained as plain text, not as control tokens"
            )
        if self.unwritten_reasoning:
            out.append(
                f"{self.unwritten_reasoning} of {self.encoded} records carry reasoning, which "
                "this model's chat template does not write, so it is not trained; a thinking "
                "model (Qwen3) trains it inside its think block"
            )
        if self.dropped:
            out.append(
                f"{self.dropped} samples had no assistant tokens left after truncation and were "
                "skipped"
            )
        return out


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model folder's tokenizer through transformers (the same code path for every model)."""
    model_dir = Path(model_dir)
    if (
        not (model_dir / "tokenizer_config.json").is_file()
        and not (model_dir / "tokenizer.json").is_file()
    ):
        raise UserError(
            f"no tokenizer in {model_dir}: expected tokenizer.json and tokenizer_config.json "
            "(download the model with `qwen-mlx download REPO_ID`)"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{model_dir}: a fast tokenizer (tokenizer.json) is required")
    if not tokenizer.chat_template:
        raise UserError(
            f"{model_dir}/tokenizer_config.json has no chat_template; use an Instruct model "
            "folder or add its family's chat template (see `qwen-mlx check`)"
        )
    return tokenizer


def end_of_text_id(tokenizer: Any) -> int:
    """Document separator for plain-text records (the family's, Qwen: <|endoftext|>)."""
    tid = tokenizer.convert_tokens_to_ids(tokenizer_family(tokenizer).document_end)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return tid
    return tokenizer.eos_token_id


def encode_text(tokenizer: Any, text: str) -> Sample:
    ids = [*hf_text(tokenizer, text)["input_ids"], end_of_text_id(tokenizer)]
    # The first token has no context inside its sample, so it is never a target.
    return Sample(ids, [0] + [1] * (len(ids) - 1))


def text_windows(sample: Sample, length: int) -> list[Sample]:
    """A long text record cut into windows of ``length`` tokens, so that none of the document
    is truncated away; a window's first token has no context in it, so it is no target."""
    starts = range(0, len(sample), length)
    windows = [sample.input_ids[at : at + length] for at in starts]
    return [Sample(ids, [0] + [1] * (len(ids) - 1)) for ids in windows if len(ids) > 1]


def encode_record(tokenizer: Any, data: dict, mask_prompt: bool = True) -> Sample:
    if "messages" in data:
        return encode_chat(tokenizer, data["messages"], mask_prompt, data.get("tools"))
    return encode_text(tokenizer, data["text"])


def encode_records(
    tokenizer: Any, records: Iterable[dict], max_seq_length: int, mask_prompt: bool = True
) -> tuple[list[Sample], EncodeReport]:
    """Encode normalized records; truncate to ``max_seq_length`` and count what that cost."""
    report = EncodeReport()
    samples = []
    controls = hf_controls(tokenizer)
    writes_reasoning = renders_reasoning(tokenizer.chat_template)
    for data in records:
        sample = encode_record(tokenizer, data, mask_prompt)
        report.encoded += 1
        texts = [m.get("content") for m in data.get("messages", [])] + [data.get("text")]
        report.control_text += spells_control(texts, controls)
        report.unwritten_reasoning += not writes_reasoning and any(
            m.get("reasoning_content") for m in data.get("messages", [])
        )
        report.lengths.append(len(sample))
        if len(sample) > max_seq_length and "text" in data:
            report.windowed += 1
            samples += text_windows(sample, max_seq_length)
            continue
        if len(sample) > max_seq_length:
            report.truncated += 1
            sample = Sample(sample.input_ids[:max_seq_length], sample.loss_mask[:max_seq_length])
        if not any(sample.loss_mask):
            report.dropped += 1
            continue
        samples.append(sample)
    return samples, report


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    """One training row: token ids, loss mask, per-sample position ids and segment ids."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())


def _row(samples: list[Sample], length: int, pad_id: int) -> Row:
    ids = np.full(length, pad_id, dtype=np.int32)
    mask = np.zeros(length, dtype=np.int8)
    pos = np.zeros(length, dtype=np.int32)
    seg = np.zeros(length, dtype=np.int32)
    at = 0
    for k, sample in enumerate(samples, start=1):
        n = len(sample)
        ids[at : at + n] = sample.input_ids
        mask[at : at + n] = sample.loss_mask
        pos[at : at + n] = np.arange(n)
        seg[at : at + n] = k
        at += n
    return Row(ids, mask, pos, seg)


def pack(samples: list[Sample], max_seq_length: int, pad_id: int) -> list[Row]:
    """First-fit-decreasing bin packing of samples into rows of ``max_seq_length`` tokens.

    Rows are padded to ``max_seq_length``; the order of rows is by construction, so the
    trainer shuffles them (seeded) each epoch.
    """
    bins: list[list[Sample]] = []
    space: list[int] = []
    for sample in sorted(samples, key=len, reverse=True):
        if len(sample) > max_seq_length:
            raise ValueError("sample longer than max_seq_length; truncate before packing")
        for b, free in enumerate(space):
            if len(sample) <= free:
                bins[b].append(sample)
                space[b] -= len(sample)
                break
        else:
            bins.append([sample])
            space.append(max_seq_length - len(sample))
    return [_row(b, max_seq_length, pad_id) for b in bins]


def unpacked(samples: list[Sample], pad_id: int) -> list[Row]:
    """One sample per row, unpadded (``collate`` pads a batch to its longest row)."""
    return [_row([s], len(s), pad_id) for s in samples]


def collate(rows: list[Row], pad_id: int) -> dict[str, np.ndarray]:
    """Stack rows into ``(batch, length)`` arrays, padding to the longest row."""
    length = max(len(r.input_ids) for r in rows)
    out = {
        "input_ids": np.full((len(rows), length), pad_id, dtype=np.int32),
        "loss_mask": np.zeros((len(rows), length), dtype=np.int8),
        "position_ids": np.zeros((len(rows), length), dtype=np.int32),
        "segment_ids": np.zeros((len(rows), length), dtype=np.int32),
    }
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        out["input_ids"][i, :n] = row.input_ids
        out["loss_mask"][i, :n] = row.loss_mask
        out["position_ids"][i, :n] = row.position_ids
        out["segment_ids"][i, :n] = row.segment_ids
    return out
