"""Benchmark: our GGUF export against llama.cpp's own converter, on a Qwen2.5-0.5B-shaped model
(``--arch qwen3``: a Qwen3-0.6B-shaped one).

Builds (once, cached in --workdir) a random bf16 model with Qwen2.5-0.5B's (Qwen3-0.6B's) exact
config and a synthetic byte-level BPE tokenizer of Qwen's size (151,643 merged tokens + 22
added; Qwen3: 26), plus a rank-16 LoRA adapter on all seven projections. Then runs, each in
its own process:

  reference f16 / q8_0   convert_hf_to_gguf.py from the llama-cpp-python sdist (its own gguf-py)
  reference q4_k_m       the same converter to bf16 (the model's own type, what our q4_k_m
                         rounds through), then llama.cpp's quantizer (llama-quantize's code,
                         llama_model_quantize through llama-cpp-python, all cores, no imatrix):
                         times added, peak RSS the larger of the two processes
  ours f16 / q8_0 / q4_k_m  qwen-mlx export --model DIR
  ours fused f16         qwen-mlx export ADAPTER (LoRA added on the fly)
  … (numpy floats)       the two above with QWEN_MLX_GGML=0, where llama-cpp-python is
                         installed: float16 conversions in numpy instead of ggml

and prints wall time and peak RSS (the process's ru_maxrss, via wait4) with the ratios the
issues set as targets: time ≤ 1.0× and peak RSS ≤ 0.6× the reference's (q4_k_m: ≤ 0.5× and
≤ 0.3×), fused ≤ 1.2× plain. It also checks that our tensors are byte-identical to the
reference's. ``--only q4_k_m`` (repeatable) runs just the variants whose name contains it.

The reference identifies tokenizers by hashing how they split a probe text and knows only
published ones, so the harness tells it ours is "qwen2" (skipping that one tokenize call).

    python bench/export.py [--arch qwen2|qwen3] [--workdir DIR] [--llama-cpp DIR] [--repeats N]
                           [--only NAME]...

--llama-cpp is the vendored llama.cpp folder of an unpacked sdist, e.g. from
`pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:`; by default the bench
looks for it in the workdir and downloads it there if missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from qwen_mlx.export import ggml_floats
from qwen_mlx.families import Family, find_family
from qwen_mlx.tensor_io import SafetensorsWriter, f32_to_bf16, save_f32
from qwen_mlx.tiny import padded_vocab_size, train_tokenizer

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
N_BPE = 151643  # Qwen's merged tokens; the added ones follow
# --arch: (config.json, added tokens, folder in the workdir, what to call it)
MODELS = {
    "qwen2": (QWEN25_05B, 22, "qwen2.5-0.5b-random", "Qwen2.5-0.5B"),
    "qwen3": (QWEN3_06B, 26, "qwen3-0.6b-random", "Qwen3-0.6B"),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SDIST = "llama-cpp-python==0.3.36"
REF_Q4 = ("ref-bf16.gguf", "ref-q4_k_m.gguf")  # the reference q4_k_m's input and output
NUMPY = " (numpy floats)"  # our variants run with QWEN_MLX_GGML=0

# Run as `python -c` in the reference's process: its tokenizer check, answered, then main().
_REFERENCE_RUNNER = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root + "/gguf-py", root]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# llama-quantize's code on a 16-bit GGUF, as a `python -c` child: Q4_K_M, all cores, no imatrix.
_QUANTIZE_RUNNER = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
src, dst = (name.encode() for name in sys.argv[1:3])
sys.exit(llama_cpp.llama_model_quantize(src, dst, ctypes.byref(params)))
"""
QUANT_TARGETS = {"f16": (1.0, 0.6), "q8_0": (1.0, 0.6), "q4_k_m": (0.5, 0.3)}  # time, RSS


# ---------------------------------------------------------------- the model folder


def _family(config: dict) -> Family:
    family = find_family(config)
    assert family is not None, config["architectures"]
    return family


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    return dict(sorted(_family(c).tensor_shapes(c).items()))


def _write_weights(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    rng = np.random.default_rng(0)
    with SafetensorsWriter(path, [(n, "BF16", s) for n, s in shapes.items()]) as writer:
        for name, shape in shapes.items():
            mean = 1.0 if name.endswith("norm.weight") else 0.0
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) + mean
            writer.write(name, [f32_to_bf16(values)])


def _synthetic_tokenizer(tiny_spec: dict, family: Family, n_added: int) -> dict:
    """tokenizer.json with Qwen's layout and size: byte alphabet, pairwise merges, then the
    added tokens: the family's control tokens, placeholders, its text tokens (``<think>``)."""
    alphabet = [tok for tok, _ in sorted(tiny_spec["model"]["vocab"].items(), key=lambda x: x[1])]
    alphabet = alphabet[:256]
    vocab = {tok: i for i, tok in enumerate(alphabet)}
    merges: list[list[str]] = []
    pieces = list(alphabet)
    for left in pieces:  # two-byte tokens first, then three-byte ones, until Qwen's count
        for right in alphabet:
            if len(vocab) == N_BPE:
                break
            token = left + right
            if token not in vocab:
                vocab[token] = len(vocab)
                merges.append([left, right])
                pieces.append(token)
    added = []
    specials, text = family.special_tokens, family.text_tokens
    extras = [f"<|extra_{i}|>" for i in range(n_added - len(specials) - len(text))]
    for i, content in enumerate([*specials, *extras, *text]):
        token = {**tiny_spec["added_tokens"][0], "id": N_BPE + i, "content": content}
        added.append(token | {"special": content not in text})
    spec = dict(tiny_spec)
    spec["model"] = {**tiny_spec["model"], "vocab": vocab, "merges": merges}
    spec["added_tokens"] = added
    return spec


def _tokenizer_config(added: list[dict], family: Family) -> dict:
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
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


def build_model(folder: Path, config: dict, n_added: int) -> Path:
    """The bf16 model with ``config`` (about 1 GB at 0.5B), built once."""
    if (folder / "model.safetensors").is_file():
        return folder
    print(f"building the benchmark model in {folder} (once) …", flush=True)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tiny = json.loads(train_tokenizer(["hello world"], 300).to_str())
    family = _family(config)
    spec = _synthetic_tokenizer(tiny, family, n_added)
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tok_config = _tokenizer_config(spec["added_tokens"], family)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False))
    assert padded_vocab_size(N_BPE + n_added) <= config["vocab_size"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "top_k": 20, "top_p": 0.8}
    (tmp / "generation_config.json").write_text(json.dumps(gen))
    _write_weights(tmp / "model.safetensors", _shapes(config))
    tmp.rename(folder)
    return folder


def build_adapter(folder: Path, model: Path, config: dict, rank: int = 16) -> Path:
    """A PEFT rank-16 LoRA on every projection of every layer (random, non-zero B)."""
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    shapes = _shapes(config)
    tensors = {}
    for name, (out_dim, in_dim) in ((n, s) for n, s in shapes.items() if len(s) == 2):
        if name.split(".")[-2] in TARGETS:
            key = "base_model.model." + name.removesuffix(".weight")
            tensors[key + ".lora_A.weight"] = rng.standard_normal((rank, in_dim), np.float32)
            tensors[key + ".lora_B.weight"] = rng.standard_normal((out_dim, rank), np.float32)
    save_f32(folder / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.05,
        "target_modules": list(TARGETS),
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def find_reference(workdir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    root = workdir / "sdist"
    found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        print(f"downloading the {SDIST} source distribution for its converter …", flush=True)
        pip = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, "-d", str(root), "-q"], check=True)
        for archive in root.glob("llama_cpp_python-*.tar.gz"):
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
        found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[0].parent


# ---------------------------------------------------------------- measuring


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process; its output is discarded."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{child.stderr.read().decode()[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024  # Linux reports KiB


def measure_all(commands: list[list[str]]) -> tuple[float, float]:
    """A pipeline of child processes run one after the other: total time, largest peak RSS."""
    results = [measure(command) for command in commands]
    return sum(t for t, _ in results), max(m for _, m in results)


def rounds(variants: dict[str, list], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Every variant once per round, ``repeats`` rounds: variants compared with each other
    (fused vs plain) ran minutes apart at most, under the same load. Dirty pages of the
    previous output are flushed first, so no run pays for another's writeback."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, command in variants.items():
            os.sync()
            pipeline = command if isinstance(command[0], list) else [command]
            runs[name].append(measure_all(pipeline))
    return runs


def same_tensors(ours: Path, reference: Path) -> bool:
    """Same tensor names, types, shapes and bytes (metadata may differ)."""
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(reference).tensors}
    if a.keys() != b.keys():
        return False
    return all(
        a[n].tensor_type == b[n].tensor_type
        and list(a[n].shape) == list(b[n].shape)
        and np.array_equal(a[n].data.view(np.uint8), b[n].data.view(np.uint8))
        for n in a
    )


def _fused_ratio(runs: dict[str, list[tuple[float, float]]], suffix: str) -> str:
    fused, plain = runs[f"ours fused f16{suffix}"], runs[f"ours f16{suffix}"]
    best = min(t for t, _ in fused) / min(t for t, _ in plain)
    per_round = sorted(f / p for (f, _), (p, _) in zip(fused, plain, strict=True))
    return (
        f"{best:.2f}x the plain f16 export's time, best against best (target ≤ 1.2); "
        f"round by round {per_round[0]:.2f}–{per_round[-1]:.2f}x, "
        f"median {per_round[len(per_round) // 2]:.2f}x"
    )


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line for line in lines if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GB RAM, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(MODELS), default="qwen2")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen-mlx-bench"))
    parser.add_argument("--llama-cpp", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (best time per variant)")
    parser.add_argument("--only", action="append", help="run the variants whose name has this")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir
    config, n_added, folder, shape = MODELS[args.arch]
    model, adapter = work / folder, work / f"{folder}-lora-r16"
    if args.build_only:
        build_adapter(adapter, build_model(model, config, n_added), config)
        return
    # Built in a child: a child's ru_maxrss starts from its parent's peak at spawn, so the
    # measuring process must stay small.
    build = [sys.executable, __file__, "--build-only", "--arch", args.arch, "--workdir", str(work)]
    subprocess.run(build, check=True)
    reference = find_reference(work, args.llama_cpp)
    out = work / "out" / args.arch
    out.mkdir(parents=True, exist_ok=True)
    ours = [sys.executable, "-m", "qwen_mlx", "export"]
    plain = [*ours, "--model", str(model)]
    ref = [sys.executable, "-c", _REFERENCE_RUNNER, str(reference), str(model)]
    variants = {
        "reference f16": [*ref, "--outtype", "f16", "--outfile", str(out / "ref-f16.gguf")],
        "ours f16": [*plain, "-o", str(out / "ours-f16.gguf")],
        "reference q8_0": [*ref, "--outtype", "q8_0", "--outfile", str(out / "ref-q8_0.gguf")],
        "ours q8_0": [*plain, "--quant", "q8_0", "-o", str(out / "ours-q8_0.gguf")],
        "ours fused f16": [*ours, str(adapter), "-o", str(out / "fused-f16.gguf")],
        "reference q4_k_m": [
            [*ref, "--outtype", "bf16", "--outfile", str(out / "ref-bf16.gguf")],
            [sys.executable, "-c", _QUANTIZE_RUNNER, *(str(out / f) for f in REF_Q4)],
        ],
        "ours q4_k_m": [*plain, "--quant", "q4_k_m", "-o", str(out / "ours-q4_k_m.gguf")],
    }
    if ggml_floats.available():  # what llama-cpp-python's float16 conversion buys, side by side
        numpy_only = ["env", "QWEN_MLX_GGML=0"]
        variants[f"ours f16{NUMPY}"] = [*numpy_only, *variants["ours f16"]]
        variants[f"ours fused f16{NUMPY}"] = [*numpy_only, *variants["ours fused f16"]]
    if args.only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in args.only)}
    size = (model / "model.safetensors").stat().st_size / 1e6
    print(f"model: {shape} shape, random bf16, {size:,.0f} MB; machine: {_machine()}")
    floats = "ggml (llama-cpp-python)" if ggml_floats.available() else "numpy"
    print(f"our float16 conversions: {floats}")
    runs = rounds(variants, args.repeats)
    results = {name: (min(t for t, _ in r), max(m for _, m in r)) for name, r in runs.items()}
    for name, (wall, rss) in results.items():
        print(f"  {name:30s} {wall:6.2f} s   peak RSS {rss:7.0f} MB   (best of {args.repeats})")
    for quant, (time_target, rss_target) in QUANT_TARGETS.items():
        if f"ours {quant}" not in results or f"reference {quant}" not in results:
            continue
        (t_ours, m_ours), (t_ref, m_ref) = results[f"ours {quant}"], results[f"reference {quant}"]
        same = same_tensors(out / f"ours-{quant}.gguf", out / f"ref-{quant}.gguf")
        print(
            f"{quant}: time {t_ours / t_ref:.2f}x reference (target ≤ {time_target}), "
            f"peak RSS {m_ours / m_ref:.2f}x (target ≤ {rss_target}), identical tensors: {same}"
        )
    fused = [s for s in ("", NUMPY) if f"ours fused f16{s}" in runs and f"ours f16{s}" in runs]
    for suffix in fused:
        print(f"fused export{suffix}: {_fused_ratio(runs, suffix)}")


if __name__ == "__main__":
    main()
