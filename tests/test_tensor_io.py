"""Streaming safetensors I/O and the float conversions fuse/export use instead of torch's.

The fast paths must give exactly the bytes the obvious ones give: a GGUF or fused model that
is off by one rounding in a corner case would be a silent bug.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen_mlx import tensor_io
from qwen_mlx.export import ggml_floats
from qwen_mlx.export.gguf_tensors import _DIRECT
from qwen_mlx.tensor_io import (
    SafetensorsWriter,
    bf16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    index_file,
    model_tensors,
)

# Every 997th float32 bit pattern: all exponents, both signs, NaN, inf, subnormals, ties.
PATTERNS = np.arange(0, 1 << 32, 997, dtype=np.uint64).astype(np.uint32).view(np.float32)


@pytest.fixture(params=["ggml", "numpy"])
def float16_path(request, monkeypatch):
    """Runs a test through ggml's conversions (llama-cpp-python installed) and numpy's."""
    if request.param == "ggml" and not ggml_floats.available():
        pytest.skip("llama-cpp-python's ggml CPU library is not installed")
    if request.param == "numpy":
        monkeypatch.setattr(ggml_floats, "_ggml", lambda: None)
    return request.param


def test_f32_to_f16_is_bit_identical_to_numpy(float16_path):
    with np.errstate(all="ignore"):
        expected = PATTERNS.astype(np.float16)
    ours = f32_to_f16(PATTERNS)
    nan = np.isnan(PATTERNS)
    assert np.array_equal(ours.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(ours[nan]).all()


def test_f32_to_f16_rounds_ties_to_even_like_numpy(float16_path):
    # Every float32 exactly halfway between two float16 neighbours (and just either side),
    # over all exponents and a spread of mantissas: where integer rounding could go wrong.
    exponents = np.arange(1, 255, dtype=np.uint32) << 23
    mantissas = np.arange(0, 1 << 23, 1 << 13, dtype=np.uint32)
    base = (exponents[:, None] | mantissas[None, :]).ravel()
    bits = np.concatenate([base | 0x1000, base | 0x0FFF, base | 0x1001])
    bits = np.concatenate([bits, bits | 0x80000000])
    values = bits.view(np.float32)
    with np.errstate(all="ignore"):
        expected = values.astype(np.float16)
    assert np.array_equal(f32_to_f16(values).view(np.uint16), expected.view(np.uint16))


def test_bf16_round_trip_is_torchs():
    torch = pytest.importorskip("torch")
    expected = torch.from_numpy(PATTERNS.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    ours = f32_to_bf16(PATTERNS)
    nan = np.isnan(PATTERNS)
    assert np.array_equal(ours[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(bf16_to_f32(ours[nan])).all()


def test_bf16_conversion_rounds_to_nearest_even_like_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    values = rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 10_000)
    # Exact halfway cases (low 16 bits 0x8000), either parity, plus specials.
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF], dtype=np.uint32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 65504.0], dtype=np.float32)
    values = np.concatenate([values, ties.view(np.float32), specials])
    ours = f32_to_bf16(values).view(np.int16)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert f32_to_bf16(np.array([np.nan], dtype=np.float32))[0] == 0x7FC0


def test_bf16_to_f16_equals_the_two_casts(float16_path):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(all="ignore"):
        expected = bf16_to_f32(bits).astype(np.float16).view(np.uint16)
    ours = _DIRECT[("BF16", "F16")](bits).view(np.uint16)
    nan = np.isnan(bf16_to_f32(bits))
    assert np.array_equal(ours[~nan], expected[~nan])
    assert np.isnan(ours.view(np.float16)[nan]).all()


def test_writer_streams_blocks_and_reader_reads_rows(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tensors = {
        "b": rng.standard_normal((7, 5), np.float32),
        "a": rng.standard_normal(3, np.float32),
    }
    plan = [(name, "BF16", value.shape) for name, value in tensors.items()]
    with SafetensorsWriter(tmp_path / "model.safetensors", plan) as writer:
        for name, value in tensors.items():
            writer.write(name, [f32_to_bf16(row[None]) for row in np.atleast_2d(value)])
    monkeypatch.setattr(tensor_io, "BLOCK_ELEMENTS", 10)  # two rows of b per block
    refs = model_tensors(tmp_path)
    assert refs.keys() == index_file(tmp_path / "model.safetensors").keys() == {"a", "b"}
    blocks = list(refs["b"].blocks())
    assert [(start, stop) for start, stop, _ in blocks] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    rows = np.concatenate([bf16_to_f32(raw) for _, _, raw in blocks])
    np.testing.assert_allclose(rows, tensors["b"], rtol=2**-8)
    np.testing.assert_array_equal(refs["b"].read_f32(3, 5), rows[3:5])


def test_writer_refuses_a_tensor_of_the_wrong_size(tmp_path):
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [("w", "F32", (2, 2))])
    with pytest.raises(AssertionError):
        writer.write("w", [np.zeros(3, np.float32)])


def test_pread_and_plain_reads_give_the_same_rows(tiny_model_dir, monkeypatch):
    import os

    from qwen_mlx.tensor_io import model_tensors

    ref = next(r for r in model_tensors(tiny_model_dir).values() if len(r.shape) == 2)
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        threaded = ref.pread(fd, 1, 3)
        monkeypatch.delattr(os, "pread")  # as on Windows
        fallback = ref.pread(fd, 1, 3)
    finally:
        os.close(fd)
    assert np.array_equal(threaded, ref.read(1, 3)) and np.array_equal(fallback, threaded)
