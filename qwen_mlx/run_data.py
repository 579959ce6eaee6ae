"""The data of one training run: records → split → token ids + masks → rows.

Shared by every backend so that one config trains on exactly the same rows everywhere.
The validation and test records actually used are written into the run folder
(``data/valid.jsonl``, ``data/test.jsonl``), and a fingerprint of the training rows is kept
in checkpoints so that resuming on changed data is refused instead of silently diverging.

Preference objectives (``training.objective: dpo | orpo``) read pairs instead
(:func:`qwen_mlx.data_prefs.load_pairs`; SFT data is then one error line, as pairs are for
SFT): each pair's chosen and rejected samples (:func:`qwen_mlx.tokens.encode_pairs`) stay
side by side in one row of ``2 × max_seq_length`` tokens (:func:`qwen_mlx.tokens.pack_pairs`).
A pair whose two answers are the same, or whose prompt leaves no answer token within
max_seq_length, is dropped and counted in one line.

Layout (``training.packing``, :func:`qwen_mlx.config.row_layout`): packed rows of
``max_seq_length`` tokens, one sample (or pair) a row, or those rows in fixed length-bucketed
batches of ``batch_size`` (:func:`qwen_mlx.tokens.bucket`); the loop shuffles rows (or,
bucketed, whole batches) each epoch. Every layout's batch holds at most ``batch_size`` rows
of at most ``max_seq_length`` tokens (twice that for pairs), what the memory estimate counts.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen_mlx.config import Config, row_layout, row_length
from qwen_mlx.data import Record, load_records, split_records
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_jsonl
from qwen_mlx.run_dir import RunDir
from qwen_mlx.tokens import (
    EncodeReport,
    Row,
    Sample,
    bucket,
    encode_pairs,
    encode_records,
    pack,
    pack_pairs,
    unpacked,
)


@dataclass
class RunData:
    train: list[Row]
    valid: list[Row]
    pad_id: int
    fingerprint: str
    messages: list[str]  # what to tell the user (counts, skipped records, truncation)
    # Bucketed layout: the fixed batches (indices into train / valid), else None: batches
    # are then batch_size rows of each epoch's order.
    train_batches: list[list[int]] | None = None
    valid_batches: list[list[int]] | None = None


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def _records(cfg: Config, run_dir: Path | None) -> tuple[list[dict], list[dict], list[str]]:
    """Training and validation records, and a summary line for each file read."""
    data = cfg.data
    records, report = load_records([data.train_file], system_prompt=data.system_prompt)
    notes = [f"{data.train_file}: {report.summary()}"]
    notes += [f"  skipped {p}" for p in report.problems[:5]] + report.warnings()
    if data.valid_file:
        valid, vreport = load_records([data.valid_file], system_prompt=data.system_prompt)
        notes += [f"{data.valid_file}: {vreport.summary()}", *vreport.warnings()]
        train = records
    else:
        parts = split_records(records, data.valid_ratio, 0.0, cfg.training.seed)
        train, valid = parts["train"], parts["valid"]
        notes.append(f"validation: {len(valid)} records split off (valid_ratio {data.valid_ratio})")
    if not train:
        raise UserError(f"{data.train_file}: no usable training records (see `qwen-mlx check`)")
    if run_dir is not None:
        write_jsonl(RunDir(run_dir).valid_data, (r.data for r in valid))
        if data.test_file and Path(data.test_file).is_file():
            test, _ = load_records([data.test_file], system_prompt=data.system_prompt)
            write_jsonl(RunDir(run_dir).test_data, (r.data for r in test))
    return [r.data for r in train], [r.data for r in valid], notes


def _rows(samples, cfg: Config, pad_id: int, layout: str) -> list[Row]:
    if layout == "packed":
        return pack(samples, cfg.training.max_seq_length, pad_id)
    return unpacked(samples, pad_id)


def fingerprint(rows: list[Row], batches: list[list[int]] | None = None) -> str:
    """What a resume must find unchanged: the rows' tokens and masks, and the batches they
    are grouped into (bucketed layout), so a run never resumes onto other batches."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.input_ids.tobytes())
        digest.update(row.loss_mask.tobytes())
    for batch in batches or []:
        digest.update(np.asarray(batch, dtype=np.int64).tobytes() + b";")
    return digest.hexdigest()[:16]


def laid_out(train: list[Row], valid: list[Row], cfg: Config, pad_id: int, layout: str) -> RunData:
    """RunData of ``train`` and ``valid`` rows in ``layout`` (bucketed: with its fixed
    batches), no messages yet; the benches build theirs from samples through it too."""
    batches = valid_batches = None
    if layout == "bucketed":
        batches = bucket(train, cfg.training.batch_size)
        valid_batches = bucket(valid, cfg.training.batch_size)
    return RunData(
        train=train,
        valid=valid,
        pad_id=pad_id,
        fingerprint=fingerprint(train, batches),
        messages=[],
        train_batches=batches,
        valid_batches=valid_batches,
    )


def sample_run_data(
    train: list[Sample], valid: list[Sample], cfg: Config, pad_id: int, layout: str
) -> RunData:
    """RunData of SFT samples in ``layout``."""
    return laid_out(
        _rows(train, cfg, pad_id, layout), _rows(valid, cfg, pad_id, layout), cfg, pad_id, layout
    )


def _with_notes(data: RunData, notes: list[str]) -> RunData:
    if data.train_batches is not None:
        notes[-1] += f", in {len(data.train_batches)} length-bucketed batches"
    data.messages = notes
    return data


def _pair_records(cfg: Config, run_dir: Path | None) -> tuple[list, list, list[str]]:
    """Training and validation pairs (as :class:`~qwen_mlx.data_prefs.Pair`), and notes."""
    from qwen_mlx.data_prefs import load_pairs

    data, objective = cfg.data, cfg.training.objective
    pairs, report = load_pairs([data.train_file], objective, data.system_prompt)
    notes = [f"{data.train_file}: {report.summary()}"]
    notes += [f"  skipped {p}" for p in report.problems[:5]]
    if data.valid_file:
        valid, vreport = load_pairs([data.valid_file], objective, data.system_prompt)
        notes.append(f"{data.valid_file}: {vreport.summary()}")
        train = pairs
    else:
        records = [Record(p.record(), source) for p, source in pairs]
        parts = split_records(records, data.valid_ratio, 0.0, cfg.training.seed)
        by_source = {source: p for p, source in pairs}
        train = [(by_source[r.source], r.source) for r in parts["train"]]
        valid = [(by_source[r.source], r.source) for r in parts["valid"]]
        notes.append(f"validation: {len(valid)} pairs split off (valid_ratio {data.valid_ratio})")
    if not train:
        raise UserError(
            f"{data.train_file}: no usable preference pairs (see `qwen-mlx data stats`)"
        )
    if data.replay_file:
        notes.append(f"data.replay_file is for SFT; training.objective {objective} does not use it")
    if not data.mask_prompt:
        notes.append(
            f"data.mask_prompt: false does not apply to {objective}: the answers are compared"
        )
    if run_dir is not None:
        write_jsonl(RunDir(run_dir).valid_data, (p.record() for p, _ in valid))
    return [p for p, _ in train], [p for p, _ in valid], notes


def _pair_run_data(cfg: Config, tokenizer: Any, run_dir: Path | None, layout: str) -> RunData:
    train, valid, notes = _pair_records(cfg, run_dir)
    max_len, t = cfg.training.max_seq_length, cfg.training
    train_pairs, report = encode_pairs(tokenizer, train, max_len)
    valid_pairs, _ = encode_pairs(tokenizer, valid, max_len)
    if not train_pairs:
        raise UserError(
            f"{cfg.data.train_file}: no pair has answer tokens within max_seq_length={max_len}; "
            "raise training.max_seq_length"
        )
    pad_id = _pad_id(tokenizer)
    packing = layout == "packed"
    rows = pack_pairs(train_pairs, row_length(t), pad_id, packing)
    notes += report.warnings(max_len)
    tokens = sum(r.num_tokens for r in rows)
    how = "packed into" if packing else "in"
    notes.append(f"{len(train_pairs)} pairs, {tokens:,} tokens, {how} {len(rows)} rows")
    valid = pack_pairs(valid_pairs, row_length(t), pad_id, packing)
    return _with_notes(laid_out(rows, valid, cfg, pad_id, layout), notes)


def layout_place(backend: str, plan: Any) -> str:
    """Where a run on ``plan`` trains, as ``training.packing: auto`` tells places apart
    (:data:`qwen_mlx.config.AUTO_LAYOUT`): the backend, ``/cpu`` added for torch on a CPU."""
    device = getattr(plan.settings, "device", None)  # torch's plan holds its torch.device
    return f"{backend}/cpu" if getattr(device, "type", None) == "cpu" else backend


def pin_layout(cfg: Config, where: str) -> None:
    """``training.packing: auto`` → the layout it picks ``where`` (true, false or bucketed), in
    place: the run's config.yaml then records it, and a resume keeps it on any machine."""
    if cfg.training.packing == "auto":
        layout = row_layout(cfg.training, where)
        cfg.training.packing = {"packed": True, "unpacked": False}.get(layout, layout)


def build_run_data(
    cfg: Config, tokenizer: Any, run_dir: Path | None = None, where: str | None = None
) -> RunData:
    """Everything a trainer iterates over: the same rows and batches wherever the same
    layout runs; ``training.packing: auto`` picks the layout of ``where`` (see
    :func:`layout_place`; if not given, of the backend ``training.backend`` resolves to)."""
    if where is None and cfg.training.packing == "auto":
        from qwen_mlx.backends import resolve

        where = resolve(cfg.training.backend)[0]
    layout = row_layout(cfg.training, where)
    if cfg.training.objective != "sft":
        return _pair_run_data(cfg, tokenizer, run_dir, layout)
    train_records, valid_records, notes = _records(cfg, run_dir)
    max_len, mask = cfg.training.max_seq_length, cfg.data.mask_prompt
    train_samples, report = encode_records(tokenizer, train_records, max_len, mask)
    valid_samples, _ = encode_records(tokenizer, valid_records, max_len, mask)
    if not train_samples:
        raise UserError(
            f"{cfg.data.train_file}: no sample has assistant tokens within max_seq_length="
            f"{max_len}; raise training.max_seq_length"
        )
    if cfg.data.replay_file and cfg.data.replay_ratio > 0:
        replayed, line = replay_samples(cfg, tokenizer, sum(map(len, train_samples)))
        train_samples += replayed
        notes.append(line)
    pad_id = _pad_id(tokenizer)
    data = sample_run_data(train_samples, valid_samples, cfg, pad_id, layout)
    notes += report.warnings(max_len)
    notes.append(_row_summary(report, data.train, layout))
    return _with_notes(data, notes)


def replay_samples(cfg: Config, tokenizer: Any, domain_tokens: int) -> tuple[list, str]:
    """Samples of ``data.replay_file`` (in a seeded order) until they are ``replay_ratio`` of
    the training tokens, and a line saying what was mixed in (or that the file ran short)."""
    data = cfg.data
    records, report = load_records([data.replay_file], system_prompt=data.system_prompt)
    if not records:
        raise UserError(f"data.replay_file {data.replay_file}: {report.summary()}")
    samples, _ = encode_records(
        tokenizer, [r.data for r in records], cfg.training.max_seq_length, data.mask_prompt
    )
    random.Random(cfg.training.seed).shuffle(samples)
    wanted = data.replay_ratio / (1 - data.replay_ratio) * domain_tokens
    taken, tokens = [], 0
    for sample in samples:
        if tokens >= wanted:
            break
        taken.append(sample)
        tokens += len(sample)
    share = tokens / (tokens + domain_tokens)
    line = (
        f"replay: {len(taken)} samples, {tokens:,} tokens ({share:.0%} of training) "
        f"from {data.replay_file}"
    )
    if tokens < 0.9 * wanted:
        line += (
            f"; it ran short of replay_ratio {data.replay_ratio:g}: answer more prompts with "
            "`qwen-mlx data replay -n N`"
        )
    return taken, line


def _row_summary(report: EncodeReport, rows: list[Row], layout: str) -> str:
    tokens = sum(r.num_tokens for r in rows)
    how = "packed into" if layout == "packed" else "in"
    return f"{report.encoded - report.dropped} samples, {tokens:,} tokens, {how} {len(rows)} rows"
