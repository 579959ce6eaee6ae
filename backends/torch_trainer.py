"""The PyTorch backend: LoRA / QLoRA with PEFT on CUDA, CPU or MPS.

The shared loop (:mod:`qwen_mlx.loop`) drives training; this module supplies its hooks
(forward/backward, AdamW update, checkpoint files) and inference (load + generate). Under
``torchrun --nproc_per_node N`` it runs as DDP: each rank trains on its share of rows,
gradients are averaged, and rank 0 writes the run folder. Importing this module does not
import torch; that happens when a backend method runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

from qwen_mlx.backends.base import Availability, GenerationSettings, TrainResult
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

        from qwen_mlx.backends.torch_model import TokenLoss

        self.torch = torch
        self.model, self.device, self.cfg = peft_model, device, cfg
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

    def micro_step(self, batch, scale: float, sync: bool) -> float:
        import contextlib

        self.model.train()
        no_sync = getattr(self.loss, "no_sync", None)
        context = no_sync() if (no_sync and not sync) else contextlib.nullcontext()
        with context:
            total = self.loss(*self._tensors(batch))
            (total * scale).backward()
        return float(total.detach())

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

    def eval_loss(self, batches) -> tuple[float, int]:
        self.model.eval()
        total, count = 0.0, 0
        inner = getattr(self.loss, "module", self.loss)  # no DDP collectives on rank 0 alone
        with self.torch.no_grad():
            for batch in batches:
                total += float(inner(*self._tensors(batch)))
                count += int(batch["loss_mask"][:, 1:].sum())
        return total, count

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


def _init_distributed() -> tuple[int, int, Any]:
    """(rank, world size, device) — DDP when started by torchrun, else a single process."""
    import torch

    from qwen_mlx.backends.torch_model import pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world, pick_device()


def run_training(
    cfg: Config, run_dir: Path, resume: bool, console: Console
) -> tuple[TrainResult, Any]:
    """Train per ``cfg`` into ``run_dir``; return the result and the trained PEFT model."""
    import torch

    from qwen_mlx.backends.torch_model import (
        add_lora,
        apply_liger,
        attention_plan,
        kernel_plan,
        load_base,
        quantization_plan,
    )
    from qwen_mlx.loop import train_loop
    from qwen_mlx.run_data import build_run_data
    from qwen_mlx.tokens import load_tokenizer

    rank, world, device = _init_distributed()
    main = rank == 0
    quantization, note = quantization_plan(cfg.model.quantization, device)
    attention, attention_note = attention_plan(cfg.training.attention, device)
    liger, kernel_note = kernel_plan(cfg.training.kernels, device)
    memory_note = _fit_memory(cfg, quantization, device)
    if main:
        console.print(f"device: {device}" + (f" ×{world} (DDP)" if world > 1 else ""))
        for line in filter(None, (note, attention_note, kernel_note, memory_note)):
            console.print(f"[yellow]⚠[/] {line}", highlight=False)
    tokenizer = load_tokenizer(cfg.model.path)
    data = build_run_data(cfg, tokenizer, run_dir if main else None)
    if main:
        for line in data.messages:
            console.print(line, highlight=False)
    base = load_base(cfg.model.path, quantization, device, attention)
    if liger:
        apply_liger(base)
    model = add_lora(base, cfg)
    hooks = TorchHooks(model, device, cfg, (rank, world), liger)
    state = train_loop(cfg, data, hooks, run_dir, console, resume)
    adapter_dir = run_dir / "adapter"
    if main:
        hooks.save_adapter(adapter_dir)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainResult(run_dir, adapter_dir, state.step), model


def _fit_memory(cfg: Config, quantization: str, device) -> str | None:
    """Checkpoint as few layers as make the run fit the device (see fit_recompute)."""
    import torch

    from qwen_mlx.memory import estimate_training_memory, fit_recompute, system_memory

    model_config = json.loads((Path(cfg.model.path) / "config.json").read_text("utf-8"))
    t = cfg.training
    estimate = estimate_training_memory(
        model_config,
        quantization=quantization,
        rank=cfg.lora.rank,
        targets=list(cfg.lora.target_modules),
        max_seq_length=t.max_seq_length,
        batch_size=t.batch_size,
        fp32=device.type == "cpu" and quantization == "none",
    )
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:  # CPU, and MPS's unified memory
        available = system_memory()
    return fit_recompute(t, estimate, available) if available else None


class TorchBackend:
    """``qwen-mlx train --backend torch`` and torch inference."""

    name = "torch"

    def availability(self) -> Availability:
        return probe_torch()

    def train(self, config: Config, run_dir: Path, resume: bool = False) -> TrainResult:
        return run_training(config, run_dir, resume, Console())[0]

    def load(self, model_dir: Path, adapter_dir: Path | None = None) -> Any:
        """(model, tokenizer) in eval mode; a PEFT adapter is applied when given."""
        import torch
        from transformers import AutoModelForCausalLM

        from qwen_mlx.backends.torch_model import pick_device
        from qwen_mlx.tokens import load_tokenizer

        device = pick_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        model.eval()
        return model, load_tokenizer(model_dir)

    def generate(
        self, loaded: Any, prompt_ids: list[int], settings: GenerationSettings
    ) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from qwen_mlx.backends.base import token_texts

        model, tokenizer = loaded
        ids = torch.tensor([prompt_ids], device=model.device)
        streamer = _TokenQueue(_end_ids(model, tokenizer))
        cancel = threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancel.is_set()

        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": settings.max_tokens,
            "streamer": streamer,
            "pad_token_id": tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
            **_sampling(settings),
        }
        thread = threading.Thread(target=streamer.run, args=(model.generate, kwargs), daemon=True)
        thread.start()
        try:
            decode = partial(tokenizer.decode, skip_special_tokens=True)
            yield from token_texts(streamer, decode)
        finally:  # also when the consumer stops early (stop string, client gone)
            cancel.set()
            thread.join()

    def score(self, loaded: Any, samples: list) -> tuple[float, int]:
        import torch

        from qwen_mlx.backends.torch_model import TokenLoss
        from qwen_mlx.tokens import collate, unpacked

        model, _ = loaded
        loss = TokenLoss(model if hasattr(model, "get_base_model") else _Plain(model))
        total, count = 0.0, 0
        with torch.no_grad():
            for row in unpacked(samples, 0):
                batch = collate([row], 0)
                keys = ("input_ids", "position_ids", "loss_mask")
                tensors = [torch.from_numpy(batch[k]).long().to(model.device) for k in keys]
                total += float(loss(*tensors))
                count += int(batch["loss_mask"][:, 1:].sum())
        return total, count


class _TokenQueue:
    """A transformers streamer that hands generated token ids to the consuming thread, up to
    (not including) an end-of-turn token."""

    def __init__(self, end_ids: set[int]):
        import queue

        self.queue: queue.Queue = queue.Queue()
        self.end_ids = end_ids
        self.prompt_seen = False
        self.error: BaseException | None = None

    def run(self, generate, kwargs) -> None:
        """``generate(**kwargs)``; a failure is re-raised in the consuming thread, which would
        otherwise wait for tokens forever."""
        try:
            generate(**kwargs)
        except BaseException as err:
            self.error = err
        finally:
            self.end()

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (ids := self.queue.get()) is not None:
            for token in ids:
                if token in self.end_ids:
                    return
                yield token
        if self.error is not None:
            raise self.error


def _end_ids(model, tokenizer) -> set[int]:
    """The tokens generate() stops at: the generation config's, else the tokenizer's EOS."""
    ends = getattr(model.generation_config, "eos_token_id", None)
    if ends is None:
        ends = tokenizer.eos_token_id
    return set(ends) if isinstance(ends, list | tuple) else {ends}


def _sampling(settings: GenerationSettings) -> dict[str, Any]:
    """Exactly the requested decoding. Qwen's generation_config.json also asks for top_k 20
    and repetition_penalty 1.05, which transformers would apply even to greedy decoding;
    the MLX and llama.cpp engines do not, so they are switched off here."""
    if settings.temperature <= 0:  # greedy; None silences the sampling defaults
        return {
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "repetition_penalty": 1.0,
        }
    return {
        "do_sample": True,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": 0,
        "repetition_penalty": 1.0,
    }


class _Plain:
    """Lets TokenLoss score a model without an adapter (the --compare-base model)."""

    def __init__(self, model):
        self.model = model

    def get_base_model(self):
        return self.model
