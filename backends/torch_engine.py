"""PyTorch inference: a base model (plus a PEFT adapter) generating with transformers.

``generate()`` runs in a thread of its own and hands token ids over a queue, so the
consumer (chat, eval, a server request) reads them as they come and can stop it at any
token; stop strings are the caller's (:func:`qwen_mlx.inference.with_stops`). Several
prompts are generated together (``pieces_batch``) by one ``generate()`` call over LEFT-padded
rows with an attention mask, so each row's new tokens line up at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from qwen_mlx.backends.base import GenerationSettings, token_texts
from qwen_mlx.inference import HFEngine


class TorchEngine(HFEngine):
    """An :class:`qwen_mlx.inference.Engine` on torch (bf16 on CUDA, else fp32)."""

    backend_name = "torch"

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from qwen_mlx.backends.torch_model import pick_device

        super().__init__(model_dir)
        device = pick_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.eval()
        self.has_adapter = adapter_dir is not None
        self.value_bytes = torch.finfo(dtype).bits // 8

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside, the model answers as its base: PEFT bypasses the adapter's layers."""
        if not self.has_adapter:
            yield
            return
        with self.model.disable_adapter():
            yield

    def pieces(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        ids = torch.tensor([prompt_ids], device=self.model.device)
        streamer = _TokenQueue(self.end_ids)
        cancel = threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancel.is_set()

        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": settings.max_tokens,
            "streamer": streamer,
            "pad_token_id": self.tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
            **_sampling(settings),
        }
        run = (self.model.generate, kwargs)
        thread = threading.Thread(target=streamer.run, args=run, daemon=True)
        thread.start()
        try:
            decode = partial(self.tokenizer.decode, skip_special_tokens=True)
            yield from token_texts(streamer, decode)
        finally:  # also when the consumer stops early (stop string, client gone)
            cancel.set()
            thread.join()

    def pieces_batch(
        self, prompts: list[list[int]], settings: GenerationSettings
    ) -> list[list[str]]:
        """The pieces of several prompts' replies, generated together: each row stops at its
        first end-of-turn token (transformers pads a finished row until all are done, or
        ``max_tokens``)."""
        import torch

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(self.end_ids)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                max_new_tokens=settings.max_tokens,
                eos_token_id=sorted(self.end_ids),
                pad_token_id=pad,
                **_sampling(settings),
            )
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        return [
            list(token_texts(_until(row, self.end_ids), decode)) for row in out[:, width:].tolist()
        ]

    def score(self, samples: list) -> tuple[float, int]:
        """Summed target-token loss of tokenized samples and their count (test loss)."""
        import torch

        from qwen_mlx.backends.torch_model import TokenLoss
        from qwen_mlx.tokens import collate, unpacked

        model = self.model
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

    def target_logits(self, sample) -> Any:
        """float32 logits (numpy, targets × vocabulary) at the positions that predict the
        sample's target tokens."""
        import numpy as np
        import torch

        ids = torch.tensor([sample.input_ids], device=self.model.device)
        targets = torch.tensor(sample.loss_mask[1:], dtype=torch.bool, device=ids.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, :-1]
            return np.asarray(logits[targets].float().cpu())


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


def _until(tokens: list[int], end_ids: set[int]) -> list[int]:
    """The tokens before the first end-of-turn token (the padding after it is no reply)."""
    ends = [i for i, token in enumerate(tokens) if token in end_ids]
    return tokens[: ends[0]] if ends else tokens


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
