"""Benchmark: how much replay cuts forgetting (general drift), on the offline tiny model.

Baseline ("plain"): the bundled 报销细则 data trained as ``make demo`` trains it. Variant
("replay"): the same, with the base model's own answers to the replay part of the shipped
general prompts mixed in (``data.replay_ratio``, default 0.2). Both take the same number of
optimizer updates (the plain run's; ``training.max_steps``), the same seed and settings.
Each run's general drift is the mean per-token KL of the tuned model from its base on the
base's answers to the held-out general prompts (what ``eval`` reports), and the result is
the ratio replay ÷ plain per seed: below 1 means replay kept the model closer to its base.

A random tiny model says nothing about answer quality; it does show whether mixing the base's
own distribution into training pulls the tuned model back toward it, which is all replay is.

    python bench/forgetting.py                 # seeds 1 2 3, ratio 0.2, torch on the CPU
    python bench/forgetting.py --seeds 1 --ratio 0.5 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "data" / "报销细则_distilled_chunked.jsonl"
QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (lives for the process)


def base_records(model: Path, split: str, n: int, max_tokens: int, temperature=0.0) -> list:
    """The base model's answers (greedy, or sampled at ``temperature``, seeded) to ``n``
    prompts of one part of the general set."""
    import torch

    from qwen_mlx.eval.drift import base_answers
    from qwen_mlx.inference import open_engine
    from qwen_mlx.replay import general_prompts, load_prompts, pick

    engine = open_engine(None, model=model, backend="torch")
    prompts = pick(load_prompts(general_prompts(), split), n, seed=0)
    torch.manual_seed(0)
    return base_answers(engine, prompts, max_tokens, temperature)


def train_and_measure(model: Path, root: Path, seed: int, args, replay: Path | None, steps=0):
    """Train one run; return (its optimizer updates, its general drift on the held-out set)."""
    from qwen_mlx.config_file import load_config, save_config
    from qwen_mlx.eval.drift import measure
    from qwen_mlx.inference import open_engine
    from qwen_mlx.training_run import train

    run = root / f"{'replay' if replay else 'plain'}-{seed}"
    sets = [
        f"model.path={model}",
        "model.quantization=none",
        f"data.train_file={TRAIN}",
        "training.backend=torch",
        f"training.num_epochs={args.epochs}",
        "training.learning_rate=2e-3",  # make demo's: the random tiny model must visibly learn
        "training.warmup_steps=5",
        "training.max_seq_length=512",
        f"training.seed={seed}",
        f"training.max_steps={steps}",
        f"output.dir={run}",
    ]
    if replay is not None:
        sets += [f"data.replay_file={replay}", f"data.replay_ratio={args.ratio}"]
    cfg = load_config(None, None, sets)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")  # as `qwen-mlx train` leaves it: eval finds the base
    result = train(cfg, run, False, QUIET)
    engine = open_engine(run, backend="torch")
    return result.steps, measure(engine, args.heldout_records, 512).kl_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--replay-prompts", type=int, default=200)
    parser.add_argument("--heldout-prompts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--replay-temperature",
        type=float,
        default=0.0,
        help="0: the base's greedy answers (data replay --temperature 0); 1: samples of its "
        "own distribution",
    )
    args = parser.parse_args()

    from qwen_mlx.fsutil import write_jsonl
    from qwen_mlx.tiny import build_tiny_model

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny", data_file=TRAIN)
        # The base's answers run to max_tokens (a random model never ends its turn); they are
        # still its own distribution, which is what replay mixes in.
        replay = root / "replay.jsonl"
        records = base_records(
            model, "replay", args.replay_prompts, args.max_tokens, args.replay_temperature
        )
        write_jsonl(replay, [{**r, "kind": "replay"} for r in records])
        args.heldout_records = base_records(model, "heldout", args.heldout_prompts, 32)
        results = []
        for seed in args.seeds:
            steps, plain = train_and_measure(model, root, seed, args, None)
            _, mixed = train_and_measure(model, root, seed, args, replay, steps)
            results.append({"seed": seed, "steps": steps, "plain": plain, "replay": mixed})
            print(json.dumps({**results[-1], "ratio": mixed / plain}), flush=True)
    ratios = [r["replay"] / r["plain"] for r in results]
    print(
        f"replay ratio {args.ratio}, temperature {args.replay_temperature}: "
        f"drift × {min(ratios):.2f}–{max(ratios):.2f} of plain "
        f"(mean {sum(ratios) / len(ratios):.2f}) over seeds {args.seeds}; "
        f"{platform.machine()} {os.cpu_count()} cores, {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
