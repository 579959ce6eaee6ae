"""The PyTorch backend: LoRA / QLoRA with PEFT on CUDA, CPU or MPS.

:func:`qwen_mlx.training_run.train` runs the shared loop (:mod:`qwen_mlx.loop`); this module
plans a run here and supplies the loop's hooks (forward/backward of the run's objective —
:mod:`qwen_mlx.objectives` — AdamW update, checkpoint files). Model code lives in
``torch_model``, inference in ``torch_engine``. Under
``torchrun --nproc_per_node N`` it runs as DDP: each rank trains on its share of rows,
gradients are averaged, and rank 0 writes the run folder. Importing this module does not
import torch; that happens when a backend method runs.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_mlx.backends.base import Availability, DevicePlan
from qwen_mlx.backends.probes import probe_torch
from qwen_mlx.checkpoints import read_part
from qwen_mlx.config import Config
from qwen_mlx.fsutil import atomic_dir

# bitsandbytes' CPU path looks for an optional kernel on the hub at import and logs a warning
# when it is absent (it always is offline); PEFT still calls transformers APIs deprecated in
# v5. Neither is actionable for a user.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings(
    "ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning
)


class TorchHooks:
    """The loop's hooks for a PEFT model (optionally DDP-wrapped)."""

    def __init__(
        self, peft_model, device, cfg: Config, dist_info: tuple[int, int], liger: bool = False
    ):
        import torch

        from qwen_mlx import objectives
        from qwen_mlx.backends.torch_model import TokenLoss

        self.torch = torch
        self.model, self.device, self.cfg = peft_model, device, cfg
        self.objective = objectives.build(cfg.training)
        self.ops = torch_ops()
        self.rank, self.world_size = dist_info
        self.loss = TokenLoss(peft_model, fused_cross_entropy=liger)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.loss = DistributedDataParallel(self.loss, device_ids=ids)
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.training.learning_rate,
            weight_decay=0.0,
            fused=device.type == "cuda",
        )
        self.rng: dict[str, Any] = {}

    def _tensors(self, batch):
        t = self.torch
        return [
            t.from_numpy(batch[k]).to(self.device, t.long)
            for k in ("input_ids", "position_ids", "loss_mask")
        ]

    def _objective_loss(self, loss_fn, batch, scales):
        """The objective's (scaled loss, sums) of ``batch`` through ``loss_fn``."""
        from qwen_mlx import objectives

        tensors = self._tensors(batch)
        if not self.objective.pairs:
            return self.objective.loss(self.ops, loss_fn(*tensors), scales)
        layout = objectives.pair_layout(batch)
        t = self.torch
        logps = loss_fn(
            *tensors, t.from_numpy(layout.sample_of_target).to(self.device), layout.samples
        )
        arrays = (
            t.from_numpy(a).to(self.device) for a in (layout.tokens, layout.ref, layout.weight)
        )
        return self.objective.loss(self.ops, objectives.pair_inputs(logps, *arrays), scales)

    def micro_step(self, batch, scales: dict[str, float], sync: bool) -> dict[str, float]:
        import contextlib

        self.model.train()
        no_sync = getattr(self.loss, "no_sync", None)
        context = no_sync() if (no_sync and not sync) else contextlib.nullcontext()
        with context:
            scaled, sums = self._objective_loss(self.loss, batch, scales)
            scaled.backward()
        return {key: float(value.detach()) for key, value in sums.items()}

    def optimizer_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        limit = self.cfg.training.max_grad_norm or float("inf")
        norm = self.torch.nn.utils.clip_grad_norm_(self.params, limit)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eval_sums(self, batches) -> dict[str, float]:
        from qwen_mlx import objectives

        self.model.eval()
        total: dict[str, float] = {}
        inner = getattr(self.loss, "module", self.loss)  # no DDP collectives on rank 0 alone
        ones = dict.fromkeys(("tokens", "pairs"), 1.0)
        with self.torch.no_grad():
            for batch in batches:
                _, sums = self._objective_loss(inner, batch, ones)
                objectives.add_sums(total, {k: float(v) for k, v in sums.items()})
        return total

    def reference_logps(self, batch):
        from qwen_mlx import objectives

        self.model.eval()
        inner = getattr(self.loss, "module", self.loss)
        layout = objectives.pair_layout(batch)
        index = self.torch.from_numpy(layout.sample_of_target).to(self.device)
        with self.torch.no_grad():
            logps = inner(*self._tensors(batch), index, layout.samples)
        return logps.float().cpu().numpy()

    def snapshot_rng(self) -> None:
        t = self.torch
        self.rng = {"cpu": t.get_rng_state()}
        if t.cuda.is_available():
            self.rng["cuda"] = t.cuda.get_rng_state_all()

    def save_state(self, folder: Path) -> None:
        save_peft_adapter(self.model, folder / "adapter")
        self._save(self.optimizer.state_dict(), folder / "optimizer.pt")
        self._save(self.rng, folder / "rng.pt")

    def _save(self, obj, path: Path) -> None:
        # Through a Python file: a full disk is then the OSError it is, which the run folder's
        # writers report in one line, rather than torch's "unexpected pos" RuntimeError.
        with open(path, "wb") as fh:
            self.torch.save(obj, fh)

    def load_state(self, folder: Path) -> None:
        """Every file is read (and checked) before any of it is applied."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        def load_to(device):
            return lambda path: self.torch.load(path, map_location=device, weights_only=True)

        adapter = folder / "adapter" / "adapter_model.safetensors"
        weights = read_part(adapter, lambda path: load_file(path, device="cpu"))
        optimizer_state = read_part(folder / "optimizer.pt", load_to(self.device))
        rng = read_part(folder / "rng.pt", load_to("cpu"))
        set_peft_model_state_dict(self.model, weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.torch.cuda.is_available():
            self.torch.cuda.set_rng_state_all(rng["cuda"])

    def save_adapter(self, folder: Path) -> None:
        with atomic_dir(folder) as tmp:
            save_peft_adapter(self.model, tmp)

    def all_reduce_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = self.torch.tensor([value], dtype=self.torch.float64, device=self.device)
        self.torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def peak_memory_gb(self) -> float:
        from qwen_mlx.backends.torch_model import peak_memory_gb

        return peak_memory_gb(self.device)

    def close(self) -> None:
        """Leave DDP's process group, if this run joined one."""
        if self.world_size > 1 and self.torch.distributed.is_initialized():
            self.torch.distributed.destroy_process_group()


def torch_ops():
    """The array functions :mod:`qwen_mlx.objectives` needs, from torch."""
    import torch
    import torch.nn.functional as F

    from qwen_mlx.objectives import Ops

    return Ops(
        log_sigmoid=F.logsigmoid,
        log1p=torch.log1p,
        exp=torch.exp,
        expm1=torch.expm1,
        log=torch.log,
        where=torch.where,
        detach=lambda x: x.detach(),
        to_float=lambda x: x.float(),
    )


def save_peft_adapter(model, folder: Path) -> None:
    """PEFT's ``save_pretrained``; a full disk, which safetensors reports as its own error
    ("… (os error 28)"), is raised as the OSError it wraps."""
    from safetensors import SafetensorError

    try:
        model.save_pretrained(folder)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(folder)) from err


def _ranks() -> tuple[int, int]:
    """(rank, world size): torchrun's, else a single process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _device(world: int):
    """This process's device: under DDP on CUDA, the GPU of its local rank."""
    import torch

    from qwen_mlx.backends.torch_model import pick_device

    if world > 1 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return pick_device()


def _device_memory(device) -> int | None:
    import torch

    from qwen_mlx import memory

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return memory.system_memory()  # CPU, and MPS's unified memory


def _init_distributed(world: int) -> None:
    """Join torchrun's process group (NCCL on CUDA, else gloo)."""
    import torch

    if world == 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@dataclass(frozen=True)
class TorchSettings:
    """What ``TorchBackend.plan`` decided for the trainer: the device (a ``torch.device``),
    the attention implementation and whether Liger's fused kernels are on."""

    device: Any
    attention: str
    liger: bool


class TorchBackend:
    """``qwen-mlx train --backend torch`` and torch inference."""

    name = "torch"

    def availability(self) -> Availability:
        return probe_torch()

    def plan(self, cfg: Config) -> DevicePlan:
        """A run of ``cfg`` on torch here: the device, ranks, and the quantization, attention
        and kernels this machine really allows (each with a note where it differs)."""
        from qwen_mlx.backends.torch_model import attention_plan, kernel_plan, quantization_plan

        rank, world = _ranks()
        device = _device(world)
        quantization, quantization_note = quantization_plan(cfg.model.quantization, device)
        attention, attention_note = attention_plan(cfg.training.attention, device)
        liger, kernel_note = kernel_plan(cfg.training.kernels, device)
        kernels = (
            "Liger Kernel (fused RMSNorm, SwiGLU, RoPE, linear + CE)" if liger else "PyTorch's"
        )
        if liger and cfg.training.objective != "sft":
            # Liger's fused linear + cross-entropy returns one total; DPO/ORPO need each
            # answer's own log-prob, so their loss takes the chunked path (the rest stays fused).
            kernels = "Liger Kernel (fused RMSNorm, SwiGLU, RoPE; chunked loss)"
            kernel_note = (
                f"training.kernels: liger: {cfg.training.objective} needs each answer's "
                "log-prob, which Liger's fused loss does not give; the loss is computed in chunks"
            )
        facts = [("torch kernels", f"attention {attention}, kernels: {kernels}")]
        if quantization != "none":
            where = (
                "CUDA" if device.type == "cuda" else f"{device.type} (bitsandbytes' CPU path: slow)"
            )
            facts.append(("quantization", f"{quantization} via bitsandbytes on {where}"))
        return DevicePlan(
            device=f"{device}" + (f" ×{world} (DDP)" if world > 1 else ""),
            quantization=quantization,
            fp32=device.type == "cpu" and quantization == "none",
            device_memory=_device_memory(device),
            rank=rank,
            world_size=world,
            facts=facts,
            notes=[n for n in (quantization_note, attention_note, kernel_note) if n],
            settings=TorchSettings(device, attention, liger),
        )

    def trainer(self, cfg: Config, plan: DevicePlan) -> TorchHooks:
        """The base on the planned device (quantized, attention, kernels as planned), PEFT LoRA,
        AdamW, DDP when started by torchrun: the loop's hooks."""
        from qwen_mlx.backends.torch_model import (
            add_lora,
            apply_liger,
            load_base,
            load_lora_weights,
        )

        _init_distributed(plan.world_size)
        settings: TorchSettings = plan.settings
        device, liger = settings.device, settings.liger
        base = load_base(cfg.model.path, plan.quantization, device, settings.attention)
        if liger:
            apply_liger(base)
        model = add_lora(base, cfg)
        if cfg.training.from_adapter:
            load_lora_weights(model, Path(cfg.training.from_adapter))
        return TorchHooks(model, device, cfg, (plan.rank, plan.world_size), liger)

    def engine(self, model_dir: Path, adapter_dir: Path | None = None):
        from qwen_mlx.backends.torch_engine import TorchEngine

        return TorchEngine(Path(model_dir), adapter_dir)
