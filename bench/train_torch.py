"""Benchmark: the torch trainer vs a plain transformers + PEFT loop, same model and data.

Baseline ("plain"): what the seed's train_3b_model.py does — one sample per step (batch 1,
no packing), gradient accumulation 4, the model's own loss over full-vocabulary logits.
Variants, each in its own process so peak memory is clean, show where a gain comes from:

    plain        batch 1, unpacked, HF loss                             (the baseline)
    packed-hf    packed rows of --seq tokens, HF loss (full logits)     (packing alone)
    ours         qwen-mlx's trainer: packed rows + target-only chunked loss, SDPA
    ours+gc      … + gradient checkpointing of every layer              (memory for speed)
    ours+sel     … + selective checkpointing (--sel-fraction of the layers)
    ours+flex    … + FlexAttention: skips the blocks between packed samples (CUDA)
    ours+liger   … + Liger Kernel: fused RMSNorm, SwiGLU, RoPE, linear + CE (CUDA)
    ours+unpacked  ours with training.packing: false (one sample a row)
    ours+bucketed  ours with training.packing: bucketed (length-sorted batches of --batch)

Options after "ours" combine: ours+liger+flex+sel; "ours" alone is training.packing: auto
(bucketed on a CPU, packed rows on a GPU). Data: seed-like synthetic chat samples
(prompt ~1/3, answer ~2/3, 120–480 tokens); every variant trains on the same samples.
tokens/s counts real (non-padding) tokens; "steady" leaves out the first optimizer step
(CUDA start-up, Triton compilation), "overall" is the whole run.

    python bench/train_torch.py                       # CPU: small model, 96 samples
    python bench/train_torch.py --device cuda --shape 3b --quant 4bit --samples 863
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "small": (256, 768, 4, 4, 2, 32768),
    "0.5b": (896, 4864, 24, 14, 2, 151936),
    "3b": (2048, 11008, 36, 16, 2, 151936),
}
VARIANTS = ("plain", "packed-hf", "ours", "ours+gc")
OPTIONS = {  # variant suffix -> config overrides
    "gc": ["training.gradient_checkpointing=true", "training.checkpoint_fraction=1"],
    "sel": ["training.gradient_checkpointing=true"],  # fraction from --sel-fraction
    "flex": ["training.attention=flex"],
    "liger": ["training.kernels=liger"],
    "unpacked": ["training.packing=false"],
    "bucketed": ["training.packing=bucketed"],
}


def shape_dims(shape: str) -> dict[str, int]:
    """config.json's sizes of a model of ``shape`` (a key of SHAPES)."""
    e, f, layers, heads, kv, vocab = SHAPES[shape]
    return dict(
        vocab_size=vocab,
        hidden_size=e,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )


def make_model(folder: Path, shape: str) -> None:
    """A random-weight Qwen2 folder of the given shape (bf16, tied, like Qwen2.5)."""
    from qwen_mlx.tensor_io import save_tensors
    from qwen_mlx.tiny import init_weights

    dims = shape_dims(shape)
    weights = init_weights(np.random.default_rng(0), dims)
    save_tensors(folder / "model.safetensors", weights, "BF16")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        **dims,
    }
    (folder / "config.json").write_text(json.dumps(config))


def make_samples(n: int, vocab: int, seed: int = 0):
    from qwen_mlx.tokens import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        length = int(rng.integers(120, 481))
        prompt = length // 3
        ids = rng.integers(10, vocab - 10, length).tolist()
        samples.append(Sample(ids, [0] * prompt + [1] * (length - prompt)))
    return samples


def bench_config(args, model_dir: Path, *extra: str):
    """The seed's LoRA settings for one epoch, without checkpoints or validation (the MLX
    bench uses them too); ``extra`` are more ``--set`` overrides."""
    from qwen_mlx.config_file import load_config

    return load_config(
        None,
        None,
        [
            f"model.path={model_dir}",
            f"model.quantization={args.quant}",
            "lora.rank=16",
            "lora.alpha=32",
            f"training.batch_size={getattr(args, 'batch', 1)}",
            "training.gradient_accumulation_steps=4",
            f"training.max_seq_length={args.seq}",
            "training.learning_rate=5e-5",
            "training.warmup_steps=2",
            "training.num_epochs=1",
            "training.save_every=100000",
            "training.eval_every=100000",
            *extra,
        ],
    )


def _config(args, model_dir: Path, options: list[str]):
    extra = [o for name in options for o in OPTIONS[name]]
    if "sel" in options:
        extra.append(f"training.checkpoint_fraction={args.sel_fraction}")
    return bench_config(args, model_dir, "training.attention=sdpa", "training.kernels=none", *extra)


def parse_variant(variant: str) -> tuple[str, list[str]]:
    """ "ours+liger+flex" -> ("ours", ["liger", "flex"]); unknown options are an error."""
    name, *options = variant.split("+")
    if name not in ("plain", "packed-hf", "ours") or (options and name != "ours"):
        raise SystemExit(f"unknown variant {variant!r}: plain, packed-hf or ours[+option…]")
    for option in options:
        if option not in OPTIONS:
            raise SystemExit(f"unknown option {option!r} in {variant!r}: {', '.join(OPTIONS)}")
    return name, options


def _hf_loss_steps(model, rows_or_samples, device, packed: bool) -> tuple[float, int]:
    """The plain loop: HF's own loss, AdamW, accumulation 4. Returns (seconds, tokens)
    after the first optimizer step, for the steady rate."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=device.type == "cuda")
    steady_start, steady_tokens = None, 0
    for i, item in enumerate(rows_or_samples):
        ids = torch.tensor(np.asarray(item.input_ids), device=device).long()[None]
        labels = ids.clone()
        labels[0, torch.tensor(np.asarray(item.loss_mask), device=device) == 0] = -100
        kwargs = {"input_ids": ids, "labels": labels, "use_cache": False}
        if packed:
            kwargs["position_ids"] = torch.tensor(item.position_ids, device=device).long()[None]
        (model(**kwargs).loss / 4).backward()
        if steady_start is not None:  # a packed row's padding has segment id 0
            segments = getattr(item, "segment_ids", None)
            steady_tokens += len(item) if segments is None else int((segments > 0).sum())
        if (i + 1) % 4 == 0:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if steady_start is None:
                _sync(device)
                steady_start = time.perf_counter()
    _sync(device)
    return time.perf_counter() - (steady_start or time.perf_counter()), steady_tokens


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _steady_from_metrics(run_dir: Path) -> tuple[float, int]:
    """(seconds, tokens) between the first and the last logged optimizer step."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("type") == "train"]
    if len(train) < 2:
        return 0.0, 0
    return train[-1]["elapsed_s"] - train[0]["elapsed_s"], train[-1]["tokens"] - train[0]["tokens"]


def worker(args) -> dict:
    import torch
    from rich.console import Console

    from qwen_mlx.backends import torch_model as tm
    from qwen_mlx.backends.torch_trainer import TorchHooks
    from qwen_mlx.config import row_layout
    from qwen_mlx.loop import train_loop
    from qwen_mlx.run_data import sample_run_data
    from qwen_mlx.tokens import pack

    device = torch.device(args.device)
    model_dir = Path(args.model_dir)
    name, options = parse_variant(args.worker)
    cfg = _config(args, model_dir, options)
    attention, note = tm.attention_plan(cfg.training.attention, device)
    liger, kernel_note = tm.kernel_plan(cfg.training.kernels, device)
    if note or kernel_note:  # a variant that cannot run here must not pass as measured
        raise SystemExit(note or kernel_note)
    base = tm.load_base(model_dir, args.quant, device, attention)
    if liger:
        tm.apply_liger(base)
    model = tm.add_lora(base, cfg)
    count = args.baseline_samples if name == "plain" and args.baseline_samples else args.samples
    samples = make_samples(count, SHAPES[args.shape][5])
    rows = pack(samples, args.seq, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if name == "plain":
        steady = _hf_loss_steps(model, samples, device, packed=False)
    elif name == "packed-hf":
        steady = _hf_loss_steps(model, rows, device, packed=True)
    else:
        hooks = TorchHooks(model, device, cfg, (0, 1), liger)
        where = f"torch/{device.type}"  # as training_run's layout_place tells devices apart
        data = sample_run_data(samples, [], cfg, 0, row_layout(cfg.training, where))
        with tempfile.TemporaryDirectory() as run_dir:
            train_loop(cfg, data, hooks, Path(run_dir), Console(quiet=True), resume=False)
            steady = _steady_from_metrics(Path(run_dir))
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(s) for s in samples)
    rate = steady[1] / steady[0] if steady[0] > 0 else float("nan")
    return {
        "variant": args.worker,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_gb": tm.peak_memory_gb(device),
        "steady_tokens_per_s": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--sel-fraction", type=float, default=0.5, help="layers recomputed")
    parser.add_argument("--batch", type=int, default=1, help="rows per micro-step (ours)")
    parser.add_argument(
        "--baseline-samples",
        type=int,
        default=0,
        help="samples for the slow plain loop (0: --samples); tokens/s is a rate either way",
    )
    parser.add_argument("--model-cache", type=Path, help="build the model here once, reuse it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    variants = args.variants.split(",")
    for variant in variants:
        parse_variant(variant)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_cache or Path(tmp)
        if not (model_dir / "config.json").is_file():
            model_dir.mkdir(parents=True, exist_ok=True)
            make_model(model_dir, args.shape)
        results = []
        for variant in variants:  # printed as they finish: a GPU lease may end mid-run
            results.append(_run_variant(args, str(model_dir), variant))
            print(json.dumps(results[-1]), flush=True)
    _print(results, args)


def _run_variant(args, model_dir: str, variant: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--model-dir",
        model_dir,
        "--device",
        args.device,
        "--shape",
        args.shape,
        "--quant",
        args.quant,
        "--samples",
        str(args.samples),
        "--seq",
        str(args.seq),
        "--sel-fraction",
        str(args.sel_fraction),
        "--batch",
        str(args.batch),
        "--baseline-samples",
        str(args.baseline_samples),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
    if out.returncode != 0:
        return {"variant": variant, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print(results: list[dict], args) -> None:
    base = next((r for r in results if r["variant"] == "plain" and "error" not in r), None)
    cpu = f"{platform.machine()} {os.cpu_count()} cores"
    machine = cpu if args.device == "cpu" else _gpu_name()
    print(
        f"machine: {machine}; shape {args.shape}, quant {args.quant}, {args.samples} samples, "
        f"rows of {args.seq}"
    )
    print(
        f"{'variant':22} {'tokens/s':>9} {'× plain':>8} {'steady':>9} {'× plain':>8} "
        f"{'peak GB':>8} {'seconds':>8}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['variant']:22} failed: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        steady = r["steady_tokens_per_s"] / base["steady_tokens_per_s"] if base else float("nan")
        print(
            f"{r['variant']:22} {r['tokens_per_s']:9.0f} {ratio:8.2f} "
            f"{r['steady_tokens_per_s']:9.0f} {steady:8.2f} {r['peak_gb']:8.2f} "
            f"{r['seconds']:8.1f}"
        )


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (absent)"


if __name__ == "__main__":
    main()
