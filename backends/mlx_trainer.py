"""The MLX backend: LoRA / QLoRA on Apple Silicon (Metal), and on CPU with ``mlx[cpu]``.

The shared loop (:mod:`qwen_mlx.loop`) drives training; this module supplies its hooks
(a compiled forward/backward, AdamW update, checkpoint files) and inference (load +
generate). Model code lives in ``mlx_model``. Importing this module does not import mlx;
that happens when a backend method runs.

Dropout randomness is a pure function of (seed, micro-step number): each micro-step
reseeds MLX's generator from that pair, so a checkpoint only needs the counter to make a
resumed run draw exactly the masks a straight run would have drawn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from qwen_mlx.backends.base import Availability, GenerationSettings, TrainResult
from qwen_mlx.backends.probes import probe_mlx
from qwen_mlx.checkpoints import read_part
from qwen_mlx.config import Config, recomputed_layers
from qwen_mlx.fsutil import atomic_dir
from qwen_mlx.memory import GiB

OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.json"


def dropout_seed(seed: int, draw: int) -> int:
    """The RNG seed of micro-step ``draw`` (mixed, so nearby seeds give unrelated masks)."""
    return int(np.random.SeedSequence([seed, draw]).generate_state(1, np.uint64)[0])


class MLXHooks:
    """The loop's hooks for an mlx-lm model carrying LoRA layers (single process)."""

    rank = 0
    world_size = 1

    def __init__(self, model, cfg: Config):
        import mlx.core as mx
        import mlx.optimizers as optim

        self.mx, self.model, self.cfg = mx, model, cfg
        self.optimizer = optim.AdamW(
            learning_rate=cfg.training.learning_rate, weight_decay=0.0, bias_correction=True
        )  # bias correction: the same update as torch.optim.AdamW
        self.optimizer.init(model.trainable_parameters())
        self.grads: Any = None
        self.draws = 0  # micro-steps taken; the dropout RNG state (see module docstring)
        self.snapshot = 0
        self._compile()

    def _compile(self) -> None:
        import mlx.nn as nn

        from qwen_mlx.backends.mlx_model import target_loss

        mx, model = self.mx, self.model
        recompute = recomputed_layers(self.cfg.training, len(self.model.model.layers))

        def scaled(model, *arrays, scale):
            loss = target_loss(model, *arrays, recompute=recompute)
            return loss * scale, loss

        grad_fn = nn.value_and_grad(model, scaled)

        # value_and_grad swaps tracers into the model while tracing, so the model is an
        # output too: the call puts its (unchanged) parameters back.
        traced = [model.state, mx.random.state]

        @partial(mx.compile, inputs=traced, outputs=traced)
        def train_step(*arrays):
            *arrays, scale = arrays
            (_, loss), grads = grad_fn(model, *arrays, scale=scale)
            return loss, grads

        @partial(mx.compile, inputs=[model.state])
        def eval_step(*arrays):
            return target_loss(model, *arrays)

        state = [model.state, self.optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def update(grads):
            grads, norm = _clip(grads, self.cfg.training.max_grad_norm)
            self.optimizer.update(model, grads)
            return norm

        self._train_step, self._eval_step, self._update = train_step, eval_step, update

    def micro_step(self, batch, scale: float, sync: bool) -> float:
        from mlx.utils import tree_map

        from qwen_mlx.backends.mlx_model import device_batch

        mx = self.mx
        self.model.train()  # traced graphs keep the mode they were traced in
        mx.random.seed(dropout_seed(self.cfg.training.seed, self.draws))
        self.draws += 1
        loss, grads = self._train_step(*device_batch(batch), mx.array(scale, mx.float32))
        self.grads = grads if self.grads is None else tree_map(mx.add, self.grads, grads)
        mx.eval(loss, self.grads)
        return loss.item()

    def optimizer_step(self, lr: float) -> float:
        mx = self.mx
        self.optimizer.learning_rate = lr
        norm = self._update(self.grads)
        mx.eval(norm, self.model.trainable_parameters(), self.optimizer.state)
        self.grads = None
        return norm.item()

    def discard_gradients(self) -> None:
        self.grads = None

    def eval_loss(self, batches) -> tuple[float, int]:
        from qwen_mlx.backends.mlx_model import device_batch

        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            total += self._eval_step(*device_batch(batch)).item()
            count += int(batch["loss_mask"][:, 1:].sum())
        self.model.train()
        self.mx.clear_cache()
        return total, count

    def snapshot_rng(self) -> None:
        self.snapshot = self.draws

    def save_state(self, folder: Path) -> None:
        from mlx.utils import tree_flatten

        write_adapter(self.model, self.cfg, folder / "adapter")
        flat = dict(tree_flatten(self.optimizer.state))
        # Through a Python file: a full disk is then an OSError (reported in one line), not
        # MLX's "[write] Unable to write" RuntimeError.
        with open(folder / OPTIMIZER_FILE, "wb") as fh:
            self.mx.save_safetensors(fh, flat)
        (folder / RNG_FILE).write_text(json.dumps({"dropout_draws": self.snapshot}))

    def load_state(self, folder: Path) -> None:
        """Every file is read (and checked) before any of it is applied."""
        from qwen_mlx.backends.mlx_model import load_peft_weights

        optimizer_state = read_part(folder / OPTIMIZER_FILE, lambda p: self.mx.load(str(p)))
        draws = read_part(
            folder / RNG_FILE, lambda p: int(json.loads(p.read_bytes())["dropout_draws"])
        )
        adapter = folder / "adapter"
        read_part(
            adapter / "adapter_model.safetensors", lambda _: load_peft_weights(self.model, adapter)
        )
        # Leaf by leaf, in place: the compiled update holds this very dict as its state.
        for key, value in optimizer_state.items():
            _set_leaf(self.optimizer.state, key, value)
        self.draws = self.snapshot = draws
        self.mx.eval(self.model.parameters(), self.optimizer.state)

    def save_adapter(self, folder: Path) -> None:
        with atomic_dir(folder) as tmp:
            write_adapter(self.model, self.cfg, tmp)

    def all_reduce_sum(self, value: float) -> float:
        return value

    def peak_memory_gb(self) -> float:
        return self.mx.get_peak_memory() / GiB


def _set_leaf(tree, dotted: str, value) -> None:
    """``tree[a][b]… = value`` for the key ``a.b.…`` of ``tree_flatten`` (digits index lists)."""
    *path, last = (int(p) if p.isdigit() else p for p in dotted.split("."))
    for part in path:
        tree = tree[part]
    tree[last] = value


def _clip(grads, max_norm: float):
    """Gradients clipped to ``max_norm`` (0: not clipped) and their norm before clipping."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    squares = [g.astype(mx.float32).square().sum() for _, g in tree_flatten(grads)]
    return grads, mx.sqrt(sum(squares))


def write_adapter(model, cfg: Config, folder: Path) -> None:
    """The canonical adapter (DESIGN §5): PEFT's files, names, shapes and config keys."""
    from qwen_mlx.adapter_convert import peft_config
    from qwen_mlx.backends.mlx_model import peft_tensors
    from qwen_mlx.tensor_io import save_f32

    folder.mkdir(parents=True, exist_ok=True)
    save_f32(folder / "adapter_model.safetensors", peft_tensors(model))
    lora = cfg.lora
    base = str(Path(cfg.model.path).resolve())
    config = peft_config(base, lora.rank, lora.alpha, lora.dropout, list(lora.target_modules))
    text = json.dumps(config, indent=2) + "\n"
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- memory guard


def _device_memory() -> tuple[int | None, dict]:
    import mlx.core as mx

    from qwen_mlx.memory import system_memory

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return info.get("memory_size") or system_memory(), info


def memory_guard(cfg: Config, console: Console) -> None:
    """Fit the run into unified memory where possible, and say plainly when it won't fit."""
    import mlx.core as mx

    from qwen_mlx.memory import estimate_training_memory, fit_recompute

    model_config = json.loads((Path(cfg.model.path) / "config.json").read_text("utf-8"))
    t = cfg.training
    estimate = estimate_training_memory(
        model_config,
        quantization=cfg.model.quantization,
        rank=cfg.lora.rank,
        targets=list(cfg.lora.target_modules),
        max_seq_length=t.max_seq_length,
        batch_size=t.batch_size,
        fp32=mx.default_device() == mx.cpu,
    )
    total, info = _device_memory()
    if "max_recommended_working_set_size" in info:  # Metal: keep the weights wired
        mx.set_wired_limit(info["max_recommended_working_set_size"])
    if total is None:
        return
    note = fit_recompute(t, estimate, total)  # before MLXHooks compiles the step
    if note:
        console.print(f"[yellow]⚠[/] {note}", highlight=False)
    estimate = estimate.with_recompute(recomputed_layers(t, estimate.layers))
    if estimate.total < 0.6 * total:
        return
    # Tight: hand freed buffers back instead of caching them, so the OS does not swap.
    mx.set_cache_limit(min(GiB, total // 16))
    verdict = "will not fit" if estimate.total > 0.9 * total else "is tight"
    console.print(
        f"[yellow]⚠[/] training memory {verdict}: estimated {estimate.describe()} of "
        f"{total / GiB:.0f} GiB. To use less: {'; '.join(_savings(cfg))}",
        highlight=False,
    )


def _savings(cfg: Config) -> list[str]:
    t = cfg.training
    tips = {
        "training.gradient_checkpointing: true": not t.gradient_checkpointing,
        f"training.max_seq_length: {max(16, t.max_seq_length // 2)}": t.max_seq_length > 512,
        "training.batch_size: 1 (raise gradient_accumulation_steps)": t.batch_size > 1,
        "model.quantization: 4bit": cfg.model.quantization != "4bit",
        "lora.rank: 8": cfg.lora.rank > 8,
    }
    return [tip for tip, useful in tips.items() if useful] + ["a smaller model (Qwen2.5-1.5B)"]


# ---------------------------------------------------------------- training


def _device_name() -> str:
    import mlx.core as mx

    return "Metal GPU" if mx.default_device() == mx.gpu else "CPU"


def run_training(
    cfg: Config, run_dir: Path, resume: bool, console: Console
) -> tuple[TrainResult, Any]:
    """Train per ``cfg`` into ``run_dir``; return the result and the trained model."""
    from qwen_mlx.backends.mlx_model import add_lora, load_base
    from qwen_mlx.loop import train_loop
    from qwen_mlx.run_data import build_run_data
    from qwen_mlx.tokens import load_tokenizer

    console.print(f"device: MLX on {_device_name()}", highlight=False)
    for key, torch_only in (("attention", "flex"), ("kernels", "liger")):
        if getattr(cfg.training, key) == torch_only:
            console.print(
                f"[yellow]⚠[/] training.{key}: {torch_only} is for the torch backend; "
                "MLX uses its own kernels",
                highlight=False,
            )
    data = build_run_data(cfg, load_tokenizer(cfg.model.path), run_dir)
    for line in data.messages:
        console.print(line, highlight=False)
    model, note = load_base(cfg.model.path, cfg.model.quantization)
    if note:
        console.print(f"[yellow]⚠[/] {note}", highlight=False)
    lora = cfg.lora
    add_lora(
        model, list(lora.target_modules), lora.rank, lora.alpha, lora.dropout, cfg.training.seed
    )
    memory_guard(cfg, console)
    hooks = MLXHooks(model, cfg)
    state = train_loop(cfg, data, hooks, run_dir, console, resume)
    adapter_dir = run_dir / "adapter"
    hooks.save_adapter(adapter_dir)
    return TrainResult(run_dir, adapter_dir, state.step), model.eval()


# ---------------------------------------------------------------- inference


@dataclass
class Loaded:
    """What ``MLXBackend.load`` returns: the model (adapter applied) and its tokenizer."""

    model: Any
    tokenizer: Any  # mlx-lm's TokenizerWrapper


def load_for_inference(model_dir: Path, adapter_dir: Path | None = None) -> Loaded:
    from mlx_lm.utils import load

    from qwen_mlx.backends.mlx_model import apply_adapter
    from qwen_mlx.families import family_of
    from qwen_mlx.model_files import read_model_config

    family = family_of(read_model_config(Path(model_dir)), model_dir)
    model, tokenizer = load(str(model_dir))
    if adapter_dir is not None:
        apply_adapter(model, Path(adapter_dir))
    for stop in family.stop_tokens:  # the turn's end, even where no config names it
        if stop in tokenizer.get_vocab():
            tokenizer.add_eos_token(stop)
    model.eval()
    return Loaded(model, tokenizer)


def stream(loaded: Loaded, prompt_ids: list[int], settings: GenerationSettings):
    """One text piece per generated token of the reply (greedy when temperature is 0)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from qwen_mlx.backends.base import token_texts

    sampler = make_sampler(temp=settings.temperature, top_p=settings.top_p)
    responses = stream_generate(
        loaded.model, loaded.tokenizer, prompt_ids, max_tokens=settings.max_tokens, sampler=sampler
    )
    # The last response carries the end-of-turn token when the model stopped by itself.
    tokens = (r.token for r in responses if r.finish_reason != "stop")
    decode = partial(loaded.tokenizer.decode, skip_special_tokens=True)
    try:
        yield from token_texts(tokens, decode)
    finally:  # stop generating now, not when the garbage collector gets to it
        responses.close()


class MLXBackend:
    """``qwen-mlx train --backend mlx`` and MLX inference."""

    name = "mlx"

    def availability(self) -> Availability:
        return probe_mlx()

    def train(self, config: Config, run_dir: Path, resume: bool = False) -> TrainResult:
        return run_training(config, run_dir, resume, Console())[0]

    def load(self, model_dir: Path, adapter_dir: Path | None = None) -> Loaded:
        """The base model (plus a PEFT or mlx-lm adapter) for inference."""
        return load_for_inference(model_dir, adapter_dir)

    def generate(
        self, loaded: Loaded, prompt_ids: list[int], settings: GenerationSettings
    ) -> Iterator[str]:
        return stream(loaded, prompt_ids, settings)

    def score(self, loaded: Loaded, samples: list) -> tuple[float, int]:
        """Summed target-token loss of tokenized samples and their count (test loss)."""
        from qwen_mlx.backends.mlx_model import device_batch, target_loss
        from qwen_mlx.tokens import collate, unpacked

        total, count = 0.0, 0
        for row in unpacked(samples, 0):
            batch = collate([row], 0)
            total += target_loss(loaded.model, *device_batch(batch)).item()
            count += int(batch["loss_mask"][:, 1:].sum())
        return total, count
