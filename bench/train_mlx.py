"""Benchmark: the MLX trainer vs mlx-lm's own LoRA trainer, same model, data and settings.

Baseline ("mlx-lm"): ``mlx_lm.tuner.trainer.train``, the loop behind ``mlx_lm.lora`` that Mac
users know: length-sorted batches padded to a multiple of 32, no packing, logits over the
whole vocabulary at every position, the loss masked to the answer. Variants, each in its own
process so peak memory is clean:

    mlx-lm         mlx-lm's trainer                                     (the baseline)
    ours-packed    qwen-mlx's MLX trainer, training.packing: true: packed rows of --seq
                   tokens, block-diagonal mask, target-only loss
    ours-unpacked  training.packing: false: one sample a row, causal mask
    ours-bucketed  training.packing: bucketed: length-sorted batches (mlx-lm's order)
    ours           the default, training.packing: auto (which layout it picks is printed)
    ours-gc        the default + gradient checkpointing                 (memory for speed)

Both start from the same base, quantized in memory the same way (4-bit, group 64, the
embedding too), LoRA rank 16 / scale 2 / dropout 0.05 on all seven linear layers of every
block, batch 1 (--batch), gradient accumulation 4, one pass over the same seed-like
synthetic samples (those of bench/train_torch.py: prompt ~1/3, answer ~2/3, 120–480
tokens). tokens/s counts real (non-padding) tokens over the whole training call,
compilation included.

    python bench/train_mlx.py                          # CPU (mlx[cpu]): tiny shape, 16 samples
    python bench/train_mlx.py --shape 0.5b --samples 400  # on a Mac
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_torch

# mlx[cpu] runs on a slow reference BLAS, so CPU runs get a smaller shape of their own.
train_torch.SHAPES.setdefault("tiny", (128, 384, 4, 4, 2, 8192))
SHAPES = train_torch.SHAPES
VARIANTS = ("mlx-lm", "ours-packed", "ours-unpacked", "ours-bucketed", "ours-gc")
PACKING = {"ours-packed": "true", "ours-unpacked": "false", "ours-bucketed": "bucketed"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MARK = "RESULT "


def _config(args, model_dir: Path, variant: str):
    return train_torch.bench_config(
        args,
        model_dir,
        f"training.gradient_checkpointing={variant == 'ours-gc'}",
        f"training.packing={PACKING.get(variant, 'auto')}",
    )


def run_ours(args, model_dir: Path, samples) -> float:
    """Seconds for one epoch of the shared loop with the MLX hooks."""
    from rich.console import Console

    from qwen_mlx.backends.mlx_model import add_lora, load_base
    from qwen_mlx.backends.mlx_trainer import MLXHooks
    from qwen_mlx.config import row_layout
    from qwen_mlx.loop import train_loop
    from qwen_mlx.run_data import sample_run_data

    cfg = _config(args, model_dir, args.worker)
    model, _ = load_base(model_dir, args.quant)
    add_lora(model, TARGETS, 16, 32, 0.05, seed=0)
    data = sample_run_data(samples, [], cfg, 0, row_layout(cfg.training, "mlx"))
    hooks = MLXHooks(model, cfg)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train_loop(cfg, data, hooks, Path(run_dir), Console(quiet=True), resume=False)
    return time.perf_counter() - start


def run_mlx_lm(args, model_dir: Path, samples) -> float:
    """Seconds for one pass of mlx-lm's trainer over the same samples, set up as mlx_lm.lora."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(model_dir)
    if mx.default_device() == mx.cpu:  # ours computes in fp32 on a CPU: compare trainers,
        model.set_dtype(mx.float32)  # not dtypes (MLX's CPU kernels emulate bf16, slowly)
    if args.quant != "none":
        model, _ = quantize_model(model, config, 64, 4 if args.quant == "4bit" else 8)
    model.freeze()
    mx.random.seed(0)
    keys = [f"self_attn.{k}" for k in TARGETS[:4]] + [f"mlp.{k}" for k in TARGETS[4:]]
    lora = {"rank": 16, "scale": 2.0, "dropout": 0.05, "keys": keys}
    linear_to_lora_layers(model, len(model.layers), lora)
    # (tokens, offset): mlx-lm masks the loss before `offset`, i.e. to the answer.
    dataset = [(s.input_ids, s.loss_mask.index(1)) for s in samples]
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArgs(
            batch_size=args.batch,
            iters=len(dataset) // args.batch,  # mlx-lm drops a last, partial batch
            val_batches=0,
            steps_per_report=len(dataset),
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=args.seq,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
            grad_accumulation_steps=4,
        )
        optimizer = optim.AdamW(learning_rate=5e-5, weight_decay=0.0)
        start = time.perf_counter()
        train(model, optimizer, dataset, None, args=training)
        return time.perf_counter() - start


def worker(args) -> dict:
    import mlx.core as mx

    samples = train_torch.make_samples(args.samples, SHAPES[args.shape][5])
    run = run_mlx_lm if args.worker == "mlx-lm" else run_ours
    seconds = run(args, Path(args.model_dir), samples)
    tokens = sum(len(s) for s in samples)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_gb = rss / (1024**3 if sys.platform == "darwin" else 1024**2)
    return {
        "variant": args.worker,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_gb": mx.get_peak_memory() / 1024**3,
        "rss_gb": rss_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES))
    parser.add_argument("--quant", default="4bit", choices=["none", "4bit", "8bit"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="batch size, every variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--rounds", type=int, default=1, help="every variant once a round; the host is noisy"
    )
    parser.add_argument("--worker", choices=[*VARIANTS, "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.samples % args.batch:
        parser.error("--samples must be a multiple of --batch (mlx-lm drops a partial batch)")
    if args.worker:
        print(MARK + json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        train_torch.make_model(Path(tmp), args.shape)
        rounds = []
        for _ in range(args.rounds):
            rounds.append([])
            for variant in args.variants.split(","):  # printed as they finish: runs are long
                rounds[-1].append(_run_variant(args, tmp, variant))
                print(json.dumps(rounds[-1][-1]), flush=True)
    for number, results in enumerate(rounds, start=1):
        print(f"\nround {number}")
        _print(results, args)


def _run_variant(args, model_dir: str, variant: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--model-dir",
        model_dir,
        "--shape",
        args.shape,
        "--quant",
        args.quant,
        "--samples",
        str(args.samples),
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    if out.returncode != 0 or not found:
        return {"variant": variant, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(found[-1][len(MARK) :])


def machine() -> str:
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    device = "Metal GPU" if mx.default_device() == mx.gpu else "CPU (mlx[cpu])"
    name = info.get("device_name") or platform.processor() or platform.machine()
    return f"{name}, {platform.machine()} {os.cpu_count()} cores, MLX {mx.__version__} on {device}"


def _print(results: list[dict], args) -> None:
    base = next((r for r in results if r["variant"] == "mlx-lm" and "error" not in r), None)
    from qwen_mlx.config import AUTO_LAYOUT

    print(f"machine: {machine()}")
    print(f"training.packing: auto is {AUTO_LAYOUT['mlx']} on MLX (ours, ours-gc)")
    print(
        f"shape {args.shape} {SHAPES[args.shape]}, quant {args.quant}, {args.samples} samples, "
        f"rows of {args.seq}, batch {args.batch}"
    )
    print(f"{'variant':14} {'tokens/s':>9} {'× mlx-lm':>9} {'peak GB':>8} {'RSS GB':>7} {'s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:14} failed: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(
            f"{r['variant']:14} {r['tokens_per_s']:9.1f} {ratio:9.2f} {r['peak_gb']:8.3f} "
            f"{r['rss_gb']:7.2f} {r['seconds']:7.1f}"
        )


if __name__ == "__main__":
    main()
