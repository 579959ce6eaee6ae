"""Benchmark: what a DPO step costs next to an SFT step of the same rows (torch trainer).

Rows: synthetic pairs (prompt ~1/3, answers 80–320 tokens, chosen and rejected of different
lengths) packed as a DPO run packs them (rows of 2 × --seq tokens, a pair's two answers side
by side). The SFT variant trains on exactly those rows as plain samples (same tokens, same
targets), so the only difference is the objective. Each variant runs in its own process so
its peak memory is its own:

    sft          the token cross-entropy of the rows                          (the baseline)
    dpo          DPO's loss of the same rows (reference log-probs attached first)
    dpo+ref      … + one more no-grad forward of the batch in every step: what computing the
                 reference in the step (instead of once, before training) would add

Printed: seconds per optimizer step, peak memory (CUDA: allocated; CPU: the process's max
RSS, model loading included), the memory estimate of the run (qwen_mlx.memory) and its
ratio to the measured peak, and the reference pass's time per row.

    python bench/preference.py --threads 1                       # CPU: small model
    python bench/preference.py --device cuda --shape 0.5b --quant 4bit
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_torch import make_model, shape_dims

VARIANTS = ("sft", "dpo", "dpo+ref")


def make_pairs(n: int, vocab: int, seq: int, seed: int = 0):
    from qwen_mlx.tokens import PairSamples, Sample

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(10, vocab - 10, int(rng.integers(40, 120))).tolist()
        sides = []
        for _ in range(2):
            answer = rng.integers(10, vocab - 10, int(rng.integers(80, 321))).tolist()
            ids = (prompt + answer)[:seq]
            sides.append(Sample(ids, ([0] * len(prompt) + [1] * len(answer))[:seq]))
        pairs.append(PairSamples(*sides))
    return pairs


def _config(args, model_dir: Path, objective: str):
    from qwen_mlx.config_file import load_config

    return load_config(
        None,
        None,
        [
            f"model.path={model_dir}",
            f"model.quantization={args.quant}",
            f"training.objective={objective}",
            f"training.max_seq_length={args.seq}",
            f"training.batch_size={args.batch}",
            "lora.dropout=0.05",
        ],
    )


def worker(args) -> dict:
    import torch

    from qwen_mlx import memory
    from qwen_mlx.backends import torch_model as tm
    from qwen_mlx.backends.torch_trainer import TorchBackend
    from qwen_mlx.loop import attach_reference
    from qwen_mlx.model_files import read_model_config
    from qwen_mlx.objectives import window_counts
    from qwen_mlx.tokens import collate, pack_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    objective = "sft" if args.variant == "sft" else "dpo"
    pairs = make_pairs(args.pairs, shape_dims(args.shape)["vocab_size"], args.seq)
    rows = pack_pairs(pairs, 2 * args.seq, 0, packing=True)
    # Same rows either way: SFT reads them as samples (their segments are plain samples).
    cfg = _config(args, Path(args.model_dir), "dpo")
    backend = TorchBackend()
    plan = backend.plan(cfg)
    cfg.training.objective = objective
    hooks = backend.trainer(cfg, plan)
    device = hooks.device
    batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
    ref_seconds = None
    if objective == "dpo":
        started = time.perf_counter()
        attach_reference(hooks, rows, args.batch, 0)
        ref_seconds = (time.perf_counter() - started) / len(rows)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step, part in enumerate(batches[: args.steps + 1]):
        batch = collate(part, 0)
        started = time.perf_counter()
        if args.variant == "dpo+ref":
            hooks.reference_logps(batch)
        counts = window_counts(hooks.objective, [batch])
        hooks.micro_step(batch, {k: 1 / v for k, v in counts.items()}, sync=True)
        hooks.optimizer_step(1e-5)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - started)
    estimate = (
        memory.estimate_training_memory(
            read_model_config(Path(args.model_dir)),
            quantization=plan.quantization,
            rank=cfg.lora.rank,
            targets=list(cfg.lora.target_modules),
            max_seq_length=2 * args.seq,  # the rows' length, as estimate_run counts it
            batch_size=args.batch,
            fp32=plan.fp32,
        ).total
        / memory.GiB
    )
    return {
        "variant": args.variant,
        "seconds_per_step": float(np.median(times)),
        "peak_gb": tm.peak_memory_gb(device),
        "estimate_gb": estimate,
        "ref_seconds_per_row": ref_seconds,
        "rows": len(rows),
        "pairs": len(pairs),
    }


def _run(args, model_dir: str, variant: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--variant", variant, "--model-dir", model_dir]
    for key in ("shape", "quant", "seq", "batch", "pairs", "steps", "device", "threads"):
        command += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=("small", "0.5b", "3b"))
    parser.add_argument("--quant", default="none")
    parser.add_argument("--seq", type=int, default=512, help="max_seq_length (rows: twice it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="sft", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp), args.shape)
        results = [_run(args, tmp, v) for v in VARIANTS]
    base = results[0]
    print(
        f"{platform.processor() or platform.machine()}, torch on {args.device}, "
        f"shape {args.shape}, quant {args.quant}, rows of {2 * args.seq} tokens, "
        f"batch {args.batch}, threads {args.threads or 'default'}"
    )
    header = ("s/step", "×sft", "peak GB", "×sft", "est GB", "est/peak")
    print(f"{'variant':10} " + " ".join(f"{h:>8}" for h in header))
    for r in results:
        print(
            f"{r['variant']:10} {r['seconds_per_step']:8.3f} "
            f"{r['seconds_per_step'] / base['seconds_per_step']:8.2f} {r['peak_gb']:8.3f} "
            f"{r['peak_gb'] / base['peak_gb']:8.3f} {r['estimate_gb']:8.2f} "
            f"{r['estimate_gb'] / r['peak_gb']:8.2f}"
        )
    dpo = results[1]
    print(
        f"reference pass before training: {dpo['ref_seconds_per_row']:.3f} s/row "
        f"({dpo['rows']} rows, {dpo['pairs']} pairs) = "
        f"{dpo['ref_seconds_per_row'] / dpo['seconds_per_step'] * args.batch:.2f} of a DPO step "
        "per row, once a run; in the step it is paid again every epoch"
    )


if __name__ == "__main__":
    main()
