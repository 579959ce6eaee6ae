"""Benchmark: the torch trainer vs a plain transformers + PEFT loop, same model and data.

Baseline ("plain"): what the seed's train_3b_model.py does — one sample per step (batch 1,
no packing), gradient accumulation 4, the model's own loss over full-vocabulary logits.
Variants, each in its own process so peak memory is clean, show where a gain comes from:

    plain       batch 1, unpacked, HF loss                              (the baseline)
    packed-hf   packed rows of --seq tokens, HF loss (full logits)      (packing alone)
    ours        qwen-mlx's trainer: packed rows + target-only chunked loss
    ours-gc     ours + gradient checkpointing                           (memory for speed)

Data: seed-like synthetic chat samples (prompt ~1/3, answer ~2/3, 120–480 tokens). Every
variant trains on the same samples; tokens/s counts real (non-padding) tokens.

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
VARIANTS = ("plain", "packed-hf", "ours", "ours-gc")


def make_model(folder: Path, shape: str) -> None:
    """A random-weight Qwen2 folder of the given shape (bf16, tied, like Qwen2.5)."""
    from qwen_mlx.tiny import init_weights, write_safetensors

    e, f, layers, heads, kv, vocab = SHAPES[shape]
    dims = dict(vocab_size=vocab, hidden_size=e, intermediate_size=f, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv)  # fmt: skip
    write_safetensors(folder / "model.safetensors", init_weights(np.random.default_rng(0), **dims),
                      "bfloat16")  # fmt: skip
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", **dims}  # fmt: skip
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


def _config(args, model_dir: Path, gc: bool):
    from qwen_mlx.config import load_config

    return load_config(None, None, [
        f"model.path={model_dir}", f"model.quantization={args.quant}", "lora.rank=16",
        "lora.alpha=32", "training.batch_size=1", "training.gradient_accumulation_steps=4",
        f"training.max_seq_length={args.seq}", "training.learning_rate=5e-5",
        "training.warmup_steps=2", "training.num_epochs=1", f"training.gradient_checkpointing={gc}",
        "training.save_every=100000", "training.eval_every=100000",
    ])  # fmt: skip


def _hf_loss_steps(model, rows_or_samples, device, packed: bool) -> None:
    """The plain loop: HF's own loss, AdamW, accumulation 4."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=device.type == "cuda")
    for i, item in enumerate(rows_or_samples):
        ids = torch.tensor(np.asarray(item.input_ids), device=device).long()[None]
        labels = ids.clone()
        labels[0, torch.tensor(np.asarray(item.loss_mask), device=device) == 0] = -100
        kwargs = {"input_ids": ids, "labels": labels, "use_cache": False}
        if packed:
            kwargs["position_ids"] = torch.tensor(item.position_ids, device=device).long()[None]
        (model(**kwargs).loss / 4).backward()
        if (i + 1) % 4 == 0:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def worker(args) -> dict:
    import torch
    from rich.console import Console

    from qwen_mlx.backends.torch_model import add_lora, load_base, peak_memory_gb
    from qwen_mlx.backends.torch_trainer import TorchHooks
    from qwen_mlx.loop import train_loop
    from qwen_mlx.run_data import RunData, fingerprint
    from qwen_mlx.tokens import pack

    device = torch.device(args.device)
    model_dir = Path(args.model_dir)
    gc = args.worker == "ours-gc"
    cfg = _config(args, model_dir, gc)
    model = add_lora(load_base(model_dir, args.quant, device), cfg, gc)
    samples = make_samples(args.samples, SHAPES[args.shape][5])
    rows = pack(samples, args.seq, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.worker == "plain":
        _hf_loss_steps(model, samples, device, packed=False)
    elif args.worker == "packed-hf":
        _hf_loss_steps(model, rows, device, packed=True)
    else:
        hooks = TorchHooks(model, device, cfg, (0, 1))
        data = RunData(train=rows, valid=[], pad_id=0, fingerprint=fingerprint(rows), messages=[])
        with tempfile.TemporaryDirectory() as run_dir:
            train_loop(cfg, data, hooks, Path(run_dir), Console(quiet=True), resume=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(s) for s in samples)
    return {"variant": args.worker, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "peak_gb": peak_memory_gb(device)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp), args.shape)
        results = [_run_variant(args, tmp, v) for v in args.variants.split(",")]
    _print(results, args)


def _run_variant(args, model_dir: str, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model-dir", model_dir,
           "--device", args.device, "--shape", args.shape, "--quant", args.quant,
           "--samples", str(args.samples), "--seq", str(args.seq)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
    if out.returncode != 0:
        return {"variant": variant, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print(results: list[dict], args) -> None:
    base = next((r for r in results if r["variant"] == "plain" and "error" not in r), None)
    cpu = f"{platform.machine()} {os.cpu_count()} cores"
    machine = cpu if args.device == "cpu" else args.device
    print(f"machine: {machine}; shape {args.shape}, quant {args.quant}, {args.samples} samples, "
          f"rows of {args.seq}")  # fmt: skip
    print(f"{'variant':10} {'tokens/s':>10} {'× plain':>8} {'peak GB':>8} {'seconds':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:10} failed: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['variant']:10} {r['tokens_per_s']:10.0f} {ratio:8.2f} {r['peak_gb']:8.2f} "
              f"{r['seconds']:8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
