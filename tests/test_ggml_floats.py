"""float16 conversions through llama-cpp-python's ggml library: used only when it is there and
gives numpy's exact bytes; otherwise, or when switched off, numpy does the work."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from qwen_mlx.export import ggml_floats
from qwen_mlx.tensor_io import f32_to_f16


def assert_float16_is_numpys():
    """f32_to_f16 on 65,536 ordinary values gives numpy's cast, bit for bit."""
    values = np.linspace(-3, 3, 1 << 16, dtype=np.float32)
    assert np.array_equal(
        f32_to_f16(values).view(np.uint16), values.astype(np.float16).view(np.uint16)
    )


@pytest.fixture
def fresh_load(monkeypatch):
    """Forget which library this process loaded, before and after the test."""
    ggml_floats._load.cache_clear()
    yield
    ggml_floats._load.cache_clear()


def test_switched_off_by_the_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_GGML", "0")
    assert not ggml_floats.available()
    assert ggml_floats.f32_to_f16(np.ones(1 << 16, np.float32)) is None


def _as_array(address: int, ctype, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctype * n).from_address(address))


class _FakeGgml:
    """A stand-in for ggml's CPU library: numpy's conversions, or (``truncate``) a float16
    conversion that is wrong in the last bit for half the values, or (``fail_after``) one
    that raises from its that-many-th call on."""

    def __init__(self, truncate: bool, fail_after: int | None = None):
        calls = [0]

        def fp32_to_fp16(source, target, n):
            calls[0] += 1
            if fail_after is not None and calls[0] > fail_after:
                raise OSError("exception: access violation writing 0x0000000000000000")
            values, halves = (
                _as_array(source, ctypes.c_float, n),
                _as_array(target, ctypes.c_uint16, n),
            )
            with np.errstate(all="ignore"):
                halves[:] = values.astype(np.float16).view(np.uint16)
            if truncate:
                halves[np.isfinite(values) & (values != 0)] &= 0xFFFE

        def bf16_to_fp32(source, target, n):
            bits, values = (
                _as_array(source, ctypes.c_uint16, n),
                _as_array(target, ctypes.c_uint32, n),
            )
            values[:] = bits.astype(np.uint32) << 16

        self.ggml_cpu_fp32_to_fp16 = fp32_to_fp16
        self.ggml_cpu_bf16_to_fp32 = bf16_to_fp32


@pytest.mark.parametrize("truncate", [False, True])
def test_used_only_if_it_gives_numpys_bytes(truncate, fresh_load, monkeypatch, tmp_path):
    fake = tmp_path / "libggml-cpu.so"
    fake.touch()
    monkeypatch.setattr(ggml_floats, "_library_file", lambda: fake)
    monkeypatch.setattr(ggml_floats.ctypes, "CDLL", lambda path: _FakeGgml(truncate))
    assert ggml_floats.available() is not truncate
    assert_float16_is_numpys()


class _Symbols:
    """A library that loads but has none of the functions (llama.cpp before spring 2025)."""


# What a changed llama-cpp-python may do to us: each must leave the export's bytes alone.
_BROKEN = {
    "functions missing": lambda: _Symbols(),
    "raises at the load check": lambda: _FakeGgml(False, fail_after=0),
    "raises during the export": lambda: _FakeGgml(False, fail_after=2),
    "wrong values": lambda: _FakeGgml(True),
}


@pytest.mark.parametrize("broken", list(_BROKEN))
def test_a_changed_library_never_changes_or_stops_an_export(
    broken, tiny_model_dir, fresh_load, monkeypatch, tmp_path
):
    from qwen_mlx.export.gguf import export

    monkeypatch.setenv("QWEN_MLX_GGML", "0")
    expected = export(None, tmp_path / "numpy.gguf", model=tiny_model_dir, quant="f16").path
    monkeypatch.delenv("QWEN_MLX_GGML")
    fake = tmp_path / "libggml-cpu.so"
    fake.touch()
    monkeypatch.setattr(ggml_floats, "_library_file", lambda: fake)
    monkeypatch.setattr(ggml_floats.ctypes, "CDLL", lambda path: _BROKEN[broken]())
    ggml_floats._load.cache_clear()
    got = export(None, tmp_path / "ggml.gguf", model=tiny_model_dir, quant="f16").path
    assert got.read_bytes() == expected.read_bytes()


def test_a_missing_library_falls_back_to_numpy(fresh_load, monkeypatch):
    monkeypatch.setattr(ggml_floats, "_library_file", lambda: Path("/nonexistent/libggml-cpu.so"))
    assert not ggml_floats.available()
    assert_float16_is_numpys()


def test_threads_convert_at_once_and_get_numpys_bytes():
    if not ggml_floats.available():
        pytest.skip("llama-cpp-python's ggml CPU library is not installed")
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal(1 << 18).astype(np.float32) * 10.0**k for k in range(-6, 6)]
    with ThreadPoolExecutor(4) as pool:
        converted = list(pool.map(ggml_floats.f32_to_f16, blocks))
    for block, halves in zip(blocks, converted, strict=True):
        with np.errstate(over="ignore"):
            expected = block.astype(np.float16)
        assert np.array_equal(halves.view(np.uint16), expected.view(np.uint16))
