"""Stream tensors in and out of safetensors files with numpy alone.

``fuse`` and ``export`` handle models far bigger than they keep in memory: a tensor (or a
block of its rows) is read with plain file reads, converted, written, and dropped. Plain
reads rather than ``mmap``, because mapped pages stay resident and would count towards the
process's memory just as if the whole model had been loaded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_mlx.errors import UserError
from qwen_mlx.export import ggml_floats
from qwen_mlx.model_files import INDEX, safetensors_header, shard_names

# Stored bytes per element; bfloat16 is read as its uint16 bit pattern (numpy has no bf16).
STORAGE = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
# Rows are processed in blocks of about this many elements (1 MB as float32). Blocks keep
# each block's decode → add LoRA → encode chain near the CPU cache and the LoRA product on one
# BLAS thread (several times faster than its threaded path here). Bigger blocks mean fewer
# numpy calls, so threads hand the GIL over less often; from 4 MB numpy asks Linux for huge
# pages, whose allocation stalls made exports slower and erratic on this machine.
BLOCK_ELEMENTS = 256 * 1024


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: bf16 is the top half of a float32)."""
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``values``, rounded to nearest even.

    Same result as torch, in uint32 arithmetic: it cannot overflow for non-NaN inputs, and
    NaNs are replaced by a quiet NaN afterwards.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + ((bits >> 16) & 1)
    rounded += 0x7FFF
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


# f32_to_f16_numpy: float32 whose magnitude lies in [2**-14, 2**16) — float16's normal range
# and the values that round into its top binade or to inf — are rounded in integer arithmetic.
_F16_NORMAL_LOW = np.uint32(113 << 23)  # 2**-14 as float32 bits
_F16_NORMAL_SPAN = np.uint32(30 << 23)  # up to 2**16


def f32_to_f16(values: np.ndarray) -> np.ndarray:
    """float16 of float32 ``values``, bit-identical to numpy's cast (round to nearest even,
    overflow to inf; a NaN stays a NaN): through ggml where llama-cpp-python is installed
    (about 15× faster), else in numpy."""
    converted = ggml_floats.f32_to_f16(values)
    return converted if converted is not None else f32_to_f16_numpy(values)


def f32_to_f16_numpy(values: np.ndarray) -> np.ndarray:
    """``f32_to_f16`` in numpy alone.

    numpy's wheels for x86-64 convert one value at a time in C (their baseline CPU has no
    F16C), about 2.6 ns a value here; this does it in about 1.4 with whole-array integer
    operations. Subnormal, huge, inf and NaN values (a handful in a real weight matrix) go
    through numpy's cast.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    # Round to nearest even at float16's last mantissa bit (bit 13), then drop 13 bits.
    # The sign stays in bit 31, so it lands at bit 18, above the 16 bits kept below.
    work = bits >> 13
    work &= np.uint32(1)
    work += bits
    work += np.uint32(0xFFF)
    work >>= 13
    half = work.astype(np.uint16)
    # Rebias the exponent from 127 to 15: subtract 112 << 10, which is 0xC000 mod 2**16
    # (exponents 113..143, kept mod 64 by the cast, land on 1..31).
    half -= np.uint16(0xC000)
    np.right_shift(bits, 16, out=work)
    work &= np.uint32(0x8000)
    half |= work.astype(np.uint16)
    np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=work)
    work -= _F16_NORMAL_LOW  # below 2**-14 wraps around to a huge value
    outside = work >= _F16_NORMAL_SPAN
    if outside.any():
        with np.errstate(over="ignore", invalid="ignore"):
            half[outside] = values[outside].astype(np.float16).view(np.uint16)
    return half.view(np.float16)


@functools.cache
def _bf16_to_f16_table() -> np.ndarray:
    """The float16 of every bfloat16 bit pattern (128 KB)."""
    with np.errstate(over="ignore"):  # bf16 beyond ±65504 becomes ±inf, as a cast would
        return bf16_to_f32(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)).astype(np.float16)


def bf16_to_f16(bits: np.ndarray) -> np.ndarray:
    """float16 of bfloat16 bit patterns (uint16), as casting through float32 gives: through
    ggml where available, else one lookup in a table of all 65,536 (6× faster than casting)."""
    converted = ggml_floats.bf16_to_f16(bits)
    return converted if converted is not None else _bf16_to_f16_table().take(bits)


def f32_to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` encoded as safetensors ``dtype`` (BF16 rounds to nearest even)."""
    encoders = {"BF16": f32_to_bf16, "F16": f32_to_f16}
    encoder = encoders.get(dtype)
    return encoder(values) if encoder else values.astype(STORAGE[dtype], copy=False)


def encode_rows(
    raw: np.ndarray,
    dtype: str,
    rows: tuple[int, int],
    pair,
    encode: Callable[[np.ndarray], np.ndarray],
    direct: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Rows ``rows`` of a stored tensor (``raw``, in ``dtype``) with the LoRA update of
    ``pair`` (an ``adapters.LoraPair``, or None) added in float32, then encoded. Without
    an update, ``direct`` (when given) converts the stored bytes without float32 at all."""
    if pair is None and direct is not None:
        return direct(raw)
    values = to_f32(raw, dtype)
    if pair is not None:
        values += pair.delta(*rows)
    return encode(values)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives in a safetensors file; reads it (or some rows) on demand."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE[self.dtype].itemsize

    def read(self, start: int = 0, stop: int | None = None, fh=None) -> np.ndarray:
        """Rows ``start:stop`` in the stored dtype (uint16 bit patterns for BF16)."""
        stop = self.rows if stop is None else stop
        storage = STORAGE[self.dtype]
        row_bytes = self.row_elements * storage.itemsize
        buf = np.empty((stop - start) * row_bytes, dtype=np.uint8)
        with contextlib.nullcontext(fh) if fh else open(self.path, "rb") as stream:
            stream.seek(self.offset + start * row_bytes)
            if stream.readinto(memoryview(buf)) != buf.nbytes:
                raise UserError(f"{self.path} changed while being read (it is shorter now)")
        return buf.view(storage).reshape((stop - start, *self.shape[1:]) if self.shape else ())

    def read_f32(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return to_f32(self.read(start, stop), self.dtype)

    def block_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` row ranges of about BLOCK_ELEMENTS each, in order."""
        step = max(1, BLOCK_ELEMENTS // max(1, self.row_elements))
        return [(start, min(self.rows, start + step)) for start in range(0, self.rows, step)]

    def blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, rows)`` blocks of about BLOCK_ELEMENTS, stored dtype, in order."""
        with open(self.path, "rb") as fh:
            for start, stop in self.block_ranges():
                yield start, stop, self.read(start, stop, fh)

    def pread(self, fd: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (read-only) through ``os.pread`` on ``fd``, an open descriptor
        of this file: no shared file position, so threads can read blocks at once."""
        if not hasattr(os, "pread"):  # Windows: a file handle per read keeps threads apart
            return self.read(start, stop)
        storage = STORAGE[self.dtype]
        row_bytes = self.row_elements * storage.itemsize
        size = (stop - start) * row_bytes
        data = os.pread(fd, size, self.offset + start * row_bytes)
        if len(data) != size:
            raise UserError(f"{self.path} changed while being read (it is shorter now)")
        return np.frombuffer(data, dtype=storage).reshape((stop - start, *self.shape[1:]))


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of raw stored data (a new array, safe to modify)."""
    return bf16_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32)


MODEL_FIX = "download the model again"


def index_file(path: Path, fix: str = MODEL_FIX) -> dict[str, TensorRef]:
    """Every tensor of one safetensors file, by name; a file cut short is an error saying
    how to get it whole (``fix``) before any tensor is read."""
    try:
        header, expected = safetensors_header(path)
        size = path.stat().st_size
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if size < expected:
        raise UserError(f"{path} is truncated; {fix} (it has {size:,} of {expected:,} bytes)")
    with open(path, "rb") as fh:
        data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in STORAGE:
            raise UserError(f"{path}: tensor {name} is {info['dtype']}; need BF16, F16 or F32")
        offset = data_start + info["data_offsets"][0]
        refs[name] = TensorRef(path, info["dtype"], tuple(info["shape"]), offset)
    return refs


def model_tensors(model_dir: Path) -> dict[str, TensorRef]:
    """Every tensor of a Hugging Face model folder (one file or shards named by the index)."""
    try:
        shards, _ = shard_names(model_dir)
    except ValueError as err:
        raise UserError(f"{err}; {MODEL_FIX}") from None
    if not shards:
        raise UserError(
            f"{model_dir} has no model.safetensors or {INDEX} "
            "(only safetensors weights are supported)"
        )
    refs: dict[str, TensorRef] = {}
    for shard in shards:
        refs.update(index_file(model_dir / shard))
    return refs


class SafetensorsWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front.

    The header goes first, so data can then be streamed tensor by tensor (in blocks of rows)
    without ever holding the file's contents; each tensor's byte count is checked.
    """

    def __init__(self, path: Path, plan: Iterable[tuple[str, str, tuple[int, ...]]]):
        self.path = path
        self._expected: list[tuple[str, int]] = []
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * STORAGE[dtype].itemsize
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, nbytes))
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # keeps tensor data 8-byte aligned, as safetensors does
        self._fh = open(path, "wb")  # noqa: SIM115 (stays open across write() calls; see close)
        self._fh.write(struct.pack("<Q", len(head)) + head)

    def write(self, name: str, blocks: Iterable[np.ndarray]) -> None:
        """Write tensor ``name`` (the next one in the plan) from its blocks of rows, in order."""
        expected_name, nbytes = self._expected.pop(0)
        assert name == expected_name, f"wrote {name}, plan says {expected_name}"
        written = 0
        for block in blocks:
            block = np.ascontiguousarray(block)
            self._fh.write(memoryview(block).cast("B"))
            written += block.nbytes
        assert written == nbytes, f"{name}: wrote {written} bytes, expected {nbytes}"

    def close(self) -> None:
        assert not self._expected, f"{len(self._expected)} tensors were never written"
        self._fh.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._fh.close()


def save_tensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write in-memory float32 ``tensors`` (adapters, the tiny model) to a safetensors file,
    names sorted, stored as ``dtype`` (F32, BF16 or F16)."""
    names = sorted(tensors)
    plan = [(name, dtype, tuple(tensors[name].shape)) for name in names]
    with SafetensorsWriter(path, plan) as writer:
        for name in names:
            values = np.asarray(tensors[name], dtype=np.float32)
            writer.write(name, [f32_to_storage(values, dtype)])


def save_f32(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write small float32 tensors (adapters) to a safetensors file, names sorted."""
    save_tensors(path, tensors, "F32")
