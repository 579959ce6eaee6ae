"""Normalized records → token ids + loss mask, and the layout of samples in rows and batches.

Chat records go through :func:`qwen_mlx.conversation.encode_chat` (the model's own chat
template, the loss on the assistant turns), plain text records end with the family's
end-of-text token. Message text is encoded as text even where it spells a control token such
as ``<|im_end|>`` (see :mod:`qwen_mlx.chat_template`, shared with eval, chat and serve);
records that do are counted in the report, as are truncated ones.

Packing puts several samples in one row of ``max_seq_length`` tokens. Each row carries
``segment_ids`` (1, 2, … per sample, 0 for padding) and ``position_ids`` restarting at 0 for
every sample, so backends can keep attention inside each sample.

Without packing a row holds one sample, unpadded, and attention costs each sample only its
own length; :func:`bucket` groups such rows into length-sorted batches
(``training.packing: bucketed``), so a batch of several carries little padding.

Preference pairs (DPO/ORPO): :func:`encode_pair` turns a pair record into its chosen and
rejected samples (targets: the answer tokens only); :func:`pack_pairs` keeps a pair's two
samples side by side in one row, chosen as segment ``2k-1`` and rejected as ``2k``, so every
batch holds whole pairs and the objective finds them by segment number alone.
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


# ---------------------------------------------------------------- preference pairs


@dataclass
class PairSamples:
    """A preference pair as two samples whose targets are the answer tokens only."""

    chosen: Sample
    rejected: Sample
    truncated: bool = False  # a side was longer than max_seq_length and was cut at the end

    @property
    def problem(self) -> str | None:
        """Why the pair cannot be trained on, or None: ``"prompt_too_long"`` (a side has no
        answer token left within max_seq_length), ``"identical"`` (nothing to prefer)."""
        if not any(self.chosen.loss_mask) or not any(self.rejected.loss_mask):
            return "prompt_too_long"
        same = self.chosen.input_ids == self.rejected.input_ids
        return "identical" if same and self.chosen.loss_mask == self.rejected.loss_mask else None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _cut(sample: Sample, length: int | None) -> Sample:
    if length is None or len(sample) <= length:
        return sample
    return Sample(sample.input_ids[:length], sample.loss_mask[:length])


def encode_pair(
    tokenizer: Any,
    record: Any,
    max_seq_length: int | None = None,
    system_prompt: str | None = None,
) -> PairSamples:
    """A pair record (any format :mod:`qwen_mlx.data_prefs` reads, or a
    :class:`~qwen_mlx.data_prefs.Pair`) → its chosen and rejected samples through the chat
    template, targets the answer turns (the prompt's own assistant turns are context). Each
    side longer than ``max_seq_length`` is cut at the end, as TRL's ``max_length`` does;
    check :attr:`PairSamples.problem` before training or scoring. A record that is not a
    readable pair raises :class:`~qwen_mlx.data_tools.RecordError`."""
    from qwen_mlx.data_prefs import Pair, read_pair

    pair = record if isinstance(record, Pair) else read_pair(record, system_prompt)
    chosen, rejected = (
        encode_chat(tokenizer, turns, True, pair.tools) for turns in pair.conversations()
    )
    cut = max_seq_length is not None and max(len(chosen), len(rejected)) > max_seq_length
    return PairSamples(_cut(chosen, max_seq_length), _cut(rejected, max_seq_length), cut)


@dataclass
class PairEncodeReport:
    """What encoding pairs cost: truncated sides, pairs dropped and why, their lengths."""

    encoded: int = 0
    truncated: int = 0
    prompt_too_long: int = 0
    identical: int = 0  # identical only after truncation cut their differences away
    lengths: list[tuple[int, int]] = field(default_factory=list)  # (chosen, rejected), uncut

    def warnings(self, max_seq_length: int) -> list[str]:
        out = []
        if self.truncated:
            out.append(
                f"{self.truncated} of {self.encoded} pairs have an answer side longer than "
                f"max_seq_length={max_seq_length}, cut at the end; raise training.max_seq_length "
                "to keep them whole"
            )
        if self.prompt_too_long:
            out.append(
                f"{self.prompt_too_long} of {self.encoded} pairs were dropped: their prompt "
                f"leaves no answer token within max_seq_length={max_seq_length}"
            )
        if self.identical:
            out.append(
                f"{self.identical} of {self.encoded} pairs were dropped: chosen and rejected are "
                f"the same within max_seq_length={max_seq_length} tokens"
            )
        return out


def encode_pairs(
    tokenizer: Any, pairs: Iterable[Any], max_seq_length: int
) -> tuple[list[PairSamples], PairEncodeReport]:
    """Encode pairs (see :func:`encode_pair`), dropping and counting the unusable ones."""
    report, out = PairEncodeReport(), []
    for pair in pairs:
        whole = encode_pair(tokenizer, pair)
        report.encoded += 1
        report.lengths.append((len(whole.chosen), len(whole.rejected)))
        samples = PairSamples(
            _cut(whole.chosen, max_seq_length),
            _cut(whole.rejected, max_seq_length),
            len(whole.chosen) > max_seq_length or len(whole.rejected) > max_seq_length,
        )
        report.truncated += samples.truncated
        problem = samples.problem
        if problem is not None:
            setattr(report, problem, getattr(report, problem) + 1)
            continue
        out.append(samples)
    return out, report


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    """One training row: token ids, loss mask, per-sample position ids and segment ids."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray
    # Preference rows: the reference model's summed answer log-prob of each segment
    # (set by the loop before training, see qwen_mlx.objectives).
    ref_logps: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def num_segments(self) -> int:
        return int(self.segment_ids.max(initial=0))


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


def _pack_units(units: list[list[Sample]], length: int, pad_id: int) -> list[Row]:
    """First-fit-decreasing bin packing of units (samples that stay side by side in one
    row) into rows of ``length`` tokens."""
    bins: list[list[Sample]] = []
    space: list[int] = []
    for unit in sorted(units, key=lambda u: sum(map(len, u)), reverse=True):
        size = sum(map(len, unit))
        if size > length:
            raise ValueError("sample longer than max_seq_length; truncate before packing")
        for b, free in enumerate(space):
            if size <= free:
                bins[b] += unit
                space[b] -= size
                break
        else:
            bins.append(list(unit))
            space.append(length - size)
    return [_row(b, length, pad_id) for b in bins]


def pack(samples: list[Sample], max_seq_length: int, pad_id: int) -> list[Row]:
    """First-fit-decreasing bin packing of samples into rows of ``max_seq_length`` tokens.

    Rows are padded to ``max_seq_length``; the order of rows is by construction, so the
    trainer shuffles them (seeded) each epoch.
    """
    return _pack_units([[s] for s in samples], max_seq_length, pad_id)


def pack_pairs(pairs: list[PairSamples], row_length: int, pad_id: int, packing: bool) -> list[Row]:
    """Rows of whole pairs (chosen, then rejected, as consecutive segments): packed into rows
    of ``row_length`` tokens, or one pair to a row, unpadded, without packing."""
    units = [[p.chosen, p.rejected] for p in pairs]
    if packing:
        return _pack_units(units, row_length, pad_id)
    return [_row(u, sum(map(len, u)), pad_id) for u in units]


def unpacked(samples: list[Sample], pad_id: int) -> list[Row]:
    """One sample per row, unpadded (``collate`` pads a batch to its longest row)."""
    return [_row([s], len(s), pad_id) for s in samples]


def bucket(rows: list[Row], batch_size: int) -> list[list[int]]:
    """Length-bucketed batches, mlx-lm's order: the indices of ``rows`` sorted by length
    (ties in row order), cut into runs of ``batch_size`` neighbours (the last may be
    shorter), so a batch pads its rows to nearly their own length.

    A pure function of the row lengths, so every run of the same data gets the same
    batches; the trainer shuffles the batches, not the rows, each epoch.
    """
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].input_ids), i))
    return [order[at : at + batch_size] for at in range(0, len(order), batch_size)]


def collate(rows: list[Row], pad_id: int) -> dict[str, np.ndarray]:
    """Stack rows into ``(batch, length)`` arrays, padding to the longest row.

    The padding's position ids go on counting from the row's last one, so a batch of
    one-sample rows reads as unpacked (transformers then keeps its plain causal mask, which
    is exact: padding only follows the sample, and is no target)."""
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
        out["position_ids"][i, n:] = np.arange(length - n) + (row.position_ids[-1] + 1 if n else 0)
        out["segment_ids"][i, :n] = row.segment_ids
    if rows[0].ref_logps is not None:
        ref = np.zeros((len(rows), max(r.num_segments for r in rows)), dtype=np.float32)
        for i, row in enumerate(rows):
            ref[i, : len(row.ref_logps)] = row.ref_logps
        out["ref_logps"] = ref
    return out
