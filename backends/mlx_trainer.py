"""The MLX backend: LoRA / QLoRA on Apple Silicon (Metal), and on CPU with ``mlx[cpu]``.

:func:`qwen_mlx.training_run.train` runs the shared loop (:mod:`qwen_mlx.loop`); this module
plans a run here and supplies the loop's hooks (a compiled forward/backward of the run's
objective — :mod:`qwen_mlx.objectives` — AdamW update, checkpoint files). Model code lives
in ``mlx_model``, inference in ``mlx_engine``. Importing this module does not import mlx;
that happens when a backend method runs.

Dropout randomness is a pure function of (seed, micro-step number): each micro-step
reseeds MLX's generator from that pair, so a checkpoint only needs the counter to make a
resumed run draw exactly the masks a straight run would have drawn.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qwen_mlx.backends.base import Availability, DevicePlan
from qwen_mlx.backends.probes import probe_mlx
from qwen_mlx.checkpoints import read_part
from qwen_mlx.config import Config, recomputed_layers
from qwen_mlx.fsutil import atomic_dir
from qwen_mlx.memory import GiB

OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.json"
PAD_PAIRS_TO = 8  # pairs per batch are rounded up to a multiple: few shapes to compile


def mlx_ops():
    """The array functions :mod:`qwen_mlx.objectives` needs, from MLX."""
    import mlx.core as mx
    import mlx.nn as nn

    from qwen_mlx.objectives import Ops

    return Ops(
        log_sigmoid=nn.log_sigmoid,
        log1p=mx.log1p,
        exp=mx.exp,
        expm1=mx.expm1,
        log=mx.log,
        where=mx.where,
        detach=mx.stop_gradient,
        to_float=lambda x: x.astype(mx.float32),
    )


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

        from qwen_mlx import objectives

        self.mx, self.model, self.cfg = mx, model, cfg
        self.objective = objectives.build(cfg.training)
        self.optimizer = optim.AdamW(
            learning_rate=cfg.training.learning_rate, weight_decay=0.0, bias_correction=True
        )  # bias correction: the same update as torch.optim.AdamW
        self.optimizer.init(model.trainable_parameters())
        self.grads: Any = None
        self.draws = 0  # micro-steps taken; the dropout RNG state (see module docstring)
        self.snapshot = 0
        self.cache_limit: int | None = None  # the MLX cache limit to restore on close
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
        if self.objective.pairs:
            self._compile_pairs(recompute, traced)

    def _compile_pairs(self, recompute: int, traced: list) -> None:
        """The steps of a preference objective: its loss (and sums) of per-sample log-probs."""
        import mlx.nn as nn

        from qwen_mlx.backends.mlx_model import sample_logps
        from qwen_mlx.objectives import pair_inputs

        mx, model, objective, ops = self.mx, self.model, self.objective, mlx_ops()

        def pair_loss(model, *arrays, recompute=0):
            *arrays, tokens, ref, weight, scale_tokens, scale_pairs = arrays
            logps = sample_logps(model, *arrays, recompute=recompute)
            x = pair_inputs(logps, tokens, ref, weight)
            scaled, sums = objective.loss(ops, x, {"tokens": scale_tokens, "pairs": scale_pairs})
            return scaled, tuple(sums[k] for k in objective.sums)

        grad_fn = nn.value_and_grad(model, partial(pair_loss, recompute=recompute))

        @partial(mx.compile, inputs=traced, outputs=traced)
        def train_step(*arrays):
            (_, sums), grads = grad_fn(model, *arrays)
            return sums, grads

        @partial(mx.compile, inputs=[model.state])
        def eval_step(*arrays):
            return pair_loss(model, *arrays)[1]

        @partial(mx.compile, inputs=[model.state])
        def logps_step(*arrays):
            return sample_logps(model, *arrays)

        self._pair_train_step, self._pair_eval_step, self._logps_step = (
            train_step,
            eval_step,
            logps_step,
        )

    def _pair_arrays(self, batch, scales: dict[str, float]) -> tuple:
        from qwen_mlx.backends.mlx_model import pair_device_batch
        from qwen_mlx.objectives import pair_layout

        mx = self.mx
        arrays = pair_device_batch(batch, pair_layout(batch, PAD_PAIRS_TO))
        scale = [mx.array(scales.get(k, 1.0), mx.float32) for k in ("tokens", "pairs")]
        return (*arrays, *scale)

    def micro_step(self, batch, scales: dict[str, float], sync: bool) -> dict[str, float]:
        from mlx.utils import tree_map

        from qwen_mlx.backends.mlx_model import device_batch

        mx = self.mx
        self.model.train()  # traced graphs keep the mode they were traced in
        mx.random.seed(dropout_seed(self.cfg.training.seed, self.draws))
        self.draws += 1
        if self.objective.pairs:
            sums, grads = self._pair_train_step(*self._pair_arrays(batch, scales))
        else:
            scale = mx.array(scales["tokens"], mx.float32)
            loss, grads = self._train_step(*device_batch(batch), scale)
            sums = (loss,)
        self.grads = grads if self.grads is None else tree_map(mx.add, self.grads, grads)
        mx.eval(sums, self.grads)
        return {k: v.item() for k, v in zip(self.objective.sums, sums, strict=True)}

    def optimizer_step(self, lr: float) -> float:
        mx = self.mx
        self.optimizer.learning_rate = lr
        norm = self._update(self.grads)
        mx.eval(norm, self.model.trainable_parameters(), self.optimizer.state)
        self.grads = None
        return norm.item()

    def discard_gradients(self) -> None:
        self.grads = None

    def eval_sums(self, batches) -> dict[str, float]:
        from qwen_mlx.backends.mlx_model import device_batch
        from qwen_mlx.objectives import add_sums

        self.model.eval()
        total: dict[str, float] = {}
        for batch in batches:
            if self.objective.pairs:
                sums = self._pair_eval_step(*self._pair_arrays(batch, {}))
            else:
                sums = (self._eval_step(*device_batch(batch)),)
            add_sums(total, {k: v.item() for k, v in zip(self.objective.sums, sums, strict=True)})
        self.model.train()
        self.mx.clear_cache()
        return total

    def reference_logps(self, batch) -> np.ndarray:
        self.model.eval()
        arrays = self._pair_arrays(batch, {})[:5]  # the model's inputs, not the objective's
        logps = self._logps_step(*arrays)
        count = int(batch["segment_ids"].max(axis=1).sum())
        self.model.train()
        return np.array(logps.astype(self.mx.float32))[:count]

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

    def close(self) -> None:
        if self.cache_limit is not None:  # the limit a tight run set (see mlx_trainer)
            self.mx.set_cache_limit(self.cache_limit)


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
    """The canonical adapter: PEFT's files, names, shapes and config keys."""
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


# ---------------------------------------------------------------- plan and trainer


def _device_memory() -> tuple[int | None, dict]:
    import mlx.core as mx

    from qwen_mlx import memory

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return info.get("memory_size") or memory.system_memory(), info


def _torch_only_notes(cfg: Config) -> list[str]:
    return [
        f"training.{key}: {value} is for the torch backend; MLX uses its own kernels"
        for key, value in (("attention", "flex"), ("kernels", "liger"))
        if getattr(cfg.training, key) == value
    ]


def _limit_memory(plan: DevicePlan) -> int | None:
    """Keep Metal's weights wired; when memory is tight, hand freed buffers back instead of
    caching them, so the OS does not swap. Returns the cache limit to restore, if changed."""
    import mlx.core as mx

    total, info = _device_memory()
    if "max_recommended_working_set_size" in info:
        mx.set_wired_limit(info["max_recommended_working_set_size"])
    if not plan.tight_memory or total is None:
        return None
    return mx.set_cache_limit(min(GiB, total // 16))


class MLXBackend:
    """``qwen-mlx train --backend mlx`` and MLX inference."""

    name = "mlx"

    def availability(self) -> Availability:
        return probe_mlx()

    def plan(self, cfg: Config) -> DevicePlan:
        """A run of ``cfg`` on MLX here: one process, Metal or CPU, the folder's quantization."""
        import mlx.core as mx

        from qwen_mlx.backends.mlx_model import stored_quantization

        on_cpu = mx.default_device() == mx.cpu
        quantization, note = stored_quantization(cfg.model.path, cfg.model.quantization)
        return DevicePlan(
            device=f"MLX on {'CPU' if on_cpu else 'Metal GPU'}",
            quantization=quantization,
            fp32=on_cpu,  # MLX's CPU path trains in float32 (see mlx_model.load_base)
            device_memory=_device_memory()[0],
            notes=_torch_only_notes(cfg) + ([note] if note else []),
        )

    def trainer(self, cfg: Config, plan: DevicePlan) -> MLXHooks:
        """The base (quantized per the config), LoRA on the targets, AdamW: the loop's hooks."""
        from qwen_mlx.backends.mlx_model import add_lora, load_base, load_peft_weights

        previous = _limit_memory(plan)
        model, _ = load_base(cfg.model.path, cfg.model.quantization)
        lora = cfg.lora
        targets = list(lora.target_modules)
        add_lora(model, targets, lora.rank, lora.alpha, lora.dropout, cfg.training.seed)
        if cfg.training.from_adapter:
            load_peft_weights(model, Path(cfg.training.from_adapter))
        hooks = MLXHooks(model, cfg)
        hooks.cache_limit = previous
        return hooks

    def engine(self, model_dir: Path, adapter_dir: Path | None = None):
        from qwen_mlx.backends.mlx_engine import MLXEngine

        return MLXEngine(Path(model_dir), adapter_dir)
