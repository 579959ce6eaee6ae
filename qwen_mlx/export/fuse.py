"""``qwen-mlx fuse``: merge a LoRA adapter into its base model, one tensor at a time.

The result is an ordinary Hugging Face folder (sharded safetensors + index, config,
tokenizer, generation config, chat template) that equals PEFT's ``merge_and_unload()``.
Each adapted weight gets ``(alpha/r)·B@A`` added in float32 and is stored back in the base's
own dtype (bf16 stays bf16); every other tensor is copied byte for byte. Only one block of
rows is in memory at a time, so a 7B model fuses in a few hundred MB of RAM.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from qwen_mlx.adapters import Adapter, LoraPair, resolve_source
from qwen_mlx.errors import UserError
from qwen_mlx.file_progress import byte_progress
from qwen_mlx.fsutil import write_json
from qwen_mlx.outputs import output_dir
from qwen_mlx.tensor_io import (
    SafetensorsWriter,
    TensorRef,
    encode_rows,
    f32_to_storage,
    model_tensors,
)

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Files of a model folder that are weights (rewritten) rather than metadata (copied).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class FuseResult:
    out_dir: Path
    fused: int  # tensors that got a LoRA update
    copied: int  # tensors copied unchanged
    notes: list[str] = field(default_factory=list)


def check_adapter_fits(adapter: Adapter, tensors: dict[str, TensorRef]) -> None:
    """Every adapted layer exists in the base with matching shapes (else a one-line error)."""
    for module, pair in adapter.pairs.items():
        ref = tensors.get(module + ".weight")
        if ref is None:
            raise UserError(f"the adapter updates {module}, which the base model does not have")
        expected = (pair.b.shape[0], pair.a.shape[1])
        if ref.shape != expected:
            raise UserError(
                f"adapter shape {expected} for {module} does not match the base {ref.shape}: "
                "was it trained on a different model? (pass the right one with --model)"
            )


def fused_blocks(ref: TensorRef, pair: LoraPair | None, out_dtype: str) -> Iterator[np.ndarray]:
    """The tensor in blocks of rows, LoRA update added in float32, encoded as ``out_dtype``."""
    encode = partial(f32_to_storage, dtype=out_dtype)
    unchanged = (lambda raw: raw) if out_dtype == ref.dtype else None
    for start, stop, raw in ref.blocks():
        yield encode_rows(raw, ref.dtype, (start, stop), pair, encode, unchanged)


def _shards(names: list[str], tensors: dict[str, TensorRef], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _copy_metadata(model_dir: Path, out_dir: Path) -> None:
    """Config, tokenizer, generation config, chat template, README…: everything but weights."""
    for path in sorted(model_dir.iterdir()):
        weights = path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEXES
        if path.is_file() and not weights:
            shutil.copy2(path, out_dir / path.name)


def fuse(
    run_or_adapter: Path,
    out_dir: Path,
    model: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
) -> FuseResult:
    """Merge the adapter of a run (or adapter folder) into its base model, in ``out_dir``.

    ``out_dir`` is replaced only if it is new, empty or an earlier fuse output (or with
    ``force``); never when it is a run folder or one of the inputs.
    """
    source = resolve_source(run_or_adapter, model)
    if source.adapter is None:
        raise UserError(f"{run_or_adapter} has no adapter to fuse: give a run or adapter folder")
    tensors = model_tensors(source.model_dir)
    check_adapter_fits(source.adapter, tensors)
    names = list(tensors)
    shards = _shards(names, tensors, max_shard_bytes)
    weight_map = {}
    with (
        output_dir(out_dir, "fuse", force, (source.model_dir, source.adapter.path)) as tmp,
        byte_progress("fusing", sum(t.nbytes for t in tensors.values())) as bar,
    ):
        _copy_metadata(source.model_dir, tmp)
        for i, shard in enumerate(shards):
            shard_name = _shard_name(i, len(shards))
            plan = [(name, tensors[name].dtype, tensors[name].shape) for name in shard]
            with SafetensorsWriter(tmp / shard_name, plan) as writer:
                for name in shard:
                    pair = source.adapter.for_weight(name)
                    writer.write(name, fused_blocks(tensors[name], pair, tensors[name].dtype))
                    weight_map[name] = shard_name
                    bar(tensors[name].nbytes)
        if len(shards) > 1:
            total = sum(tensors[name].nbytes for name in names)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_json(tmp / "model.safetensors.index.json", index)
    fused = len(source.adapter.pairs)
    notes = [source.qlora_note] if source.qlora_note else []
    return FuseResult(Path(out_dir), fused, len(names) - fused, notes)
