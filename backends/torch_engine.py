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
            **_sampling(settings, len(prompt_ids)),
        }
        run = (partial(_seeded, self.model.generate, settings.seed), kwargs)
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
                **_sampling(settings, width),
            )
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        return [
            list(token_texts(_until(row, self.end_ids), decode)) for row in out[:, width:].tolist()
        ]

    def decoder(self) -> TorchDecoder:
        """Continuous batching over this model (``serve``)."""
        return TorchDecoder(self)

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


class _Row:
    """One sequence of a :class:`TorchDecoder`: its settings, the token it feeds next, how
    many real tokens its cache row holds, the tokens it has generated, and its own random
    generator (seeded by the request's ``seed``), so what it samples does not depend on what
    else is in the batch."""

    def __init__(self, seq: int, prompt: list[int], settings: GenerationSettings):
        import torch

        self.seq, self.prompt, self.settings = seq, prompt, settings
        self.last, self.length, self.count = -1, 0, 0
        self.generated: list[int] = []
        self.chain = _processors(settings, len(prompt))
        self.generator = None
        if settings.temperature > 0:
            self.generator = torch.Generator()
            if settings.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(settings.seed)

    def pick(self, logits, greedy: int) -> int:
        """The next token: ``greedy`` (the batch's argmax) at temperature 0 without
        penalties, else from the sequence's own logits processors (penalties, temperature,
        top-k, top-p, min-p) and, above temperature 0, its own generator."""
        import torch

        if self.generator is None and not self.chain:
            token = greedy
        else:
            history = torch.tensor([self.prompt + self.generated])
            scores = self.chain(history, logits.float().cpu()[None])[0]
            if self.generator is None:
                token = int(scores.argmax())
            else:
                probs = torch.softmax(scores, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.generated.append(token)
        return token


class TorchDecoder:
    """Continuous batching on torch (:class:`qwen_mlx.inference.Decoder`).

    The batch is one KV cache (transformers' ``DynamicCache``, rows × heads × columns × dim)
    whose rows are the sequences, right-aligned: a row's real tokens are its last columns, the
    columns before them padding that the attention mask hides, and each row's positions
    count only its real tokens, so every row attends exactly as it would alone. A joining
    sequence reads its prompt alone (as one-by-one generation does) and its cache is then
    padded on the left to the batch's width (or the batch to its) and added as a row. A
    sequence that leaves is dropped from the rows, and columns only padding holds are cut.

    transformers' own continuous batching (``generate_batch``) runs its own thread with a
    paged cache and one generation config for all requests; serve needs per-request
    sampling and the adapter switched per batch, so the loop is ours, on its cache.
    """

    def __init__(self, engine: TorchEngine):
        self.model, self.end_ids = engine.model, engine.end_ids
        self.decode = partial(engine.tokenizer.decode, skip_special_tokens=True)
        self._rows: list[_Row] = []  # in the cache's row order
        self._joining: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None  # rows × columns: 1 where a row has a real token
        self._seqs = 0
        self._cache_kwarg = _cache_kwarg(engine.model)

    def __len__(self) -> int:
        return len(self._rows) + len(self._joining)

    def join(self, prompt_ids: list[int], settings: GenerationSettings) -> int:
        self._seqs += 1
        self._joining.append(_Row(self._seqs, prompt_ids, settings))
        return self._seqs

    def leave(self, seq: int) -> None:
        self._joining = [row for row in self._joining if row.seq != seq]
        keep = [i for i, row in enumerate(self._rows) if row.seq != seq]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def step(self) -> list:
        import torch

        with torch.inference_mode():
            steps = self._decode() if self._rows else []
            joining, self._joining = self._joining, []
            steps += [self._prefill(row) for row in joining]
        return steps

    def _decode(self) -> list:
        import torch

        from qwen_mlx.inference import Step

        device = self.model.device
        inputs = torch.tensor([[row.last] for row in self._rows], device=device)
        self._mask = torch.cat([self._mask, torch.ones_like(inputs)], dim=1)
        positions = torch.tensor([[row.length] for row in self._rows], device=device)
        logits = self.model(
            input_ids=inputs,
            attention_mask=self._mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: self._cache},
        ).logits[:, -1, :]
        greedy = logits.argmax(-1).tolist()
        steps, keep = [], []
        for i, row in enumerate(self._rows):
            token = row.pick(logits[i], greedy[i])
            row.length, row.count, row.last = row.length + 1, row.count + 1, token
            if token in self.end_ids:
                steps.append(Step(row.seq, None, True))
            else:
                done = row.count >= row.settings.max_tokens
                steps.append(Step(row.seq, token, done))
                if not done:
                    keep.append(i)
        if len(keep) < len(self._rows):
            self._keep(keep)
        return steps

    def _prefill(self, row: _Row):
        import torch
        from transformers import DynamicCache

        from qwen_mlx.inference import Step

        ids = torch.tensor([row.prompt], device=self.model.device)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        ).logits[:, -1, :]
        token = row.pick(logits[0], int(logits[0].argmax()))
        row.length, row.count, row.last = len(row.prompt), 1, token
        if token in self.end_ids:
            return Step(row.seq, None, True)
        if row.settings.max_tokens <= 1:
            return Step(row.seq, token, True)
        self._add(row, cache)
        return Step(row.seq, token, False)

    def _add(self, row: _Row, cache: Any) -> None:
        """Add a sequence's cache as the batch's last row, the narrower padded on the left."""
        import torch
        from torch.nn.functional import pad

        mask = torch.ones((1, row.length), dtype=torch.long, device=self.model.device)
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, [row]
            return
        width = max(self._mask.shape[1], row.length)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                a = pad(a, (0, 0, width - a.shape[-2], 0))
                b = pad(b, (0, 0, width - b.shape[-2], 0))
                setattr(mine, name, torch.cat([a, b], dim=0))
        self._mask = torch.cat(
            [pad(self._mask, (width - self._mask.shape[1], 0)), pad(mask, (width - row.length, 0))]
        )
        self._rows.append(row)

    def _keep(self, keep: list[int]) -> None:
        """Keep these rows (in order); cut the columns that are padding in all of them."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        import torch

        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        start = int(mask.any(dim=0).int().argmax())  # the first column a row uses
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes the KV cache: ``cache`` since transformers 5.2x,
    ``past_key_values`` before (still accepted, with a deprecation warning)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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


def _sampling(settings: GenerationSettings, prompt_length: int) -> dict[str, Any]:
    """Exactly the requested decoding for ``generate()``. Qwen's generation_config.json also
    asks for top_k 20 and repetition_penalty 1.05, which transformers would apply even to
    greedy decoding; only what the request asks for is applied (as on MLX and llama.cpp).
    ``prompt_length``: where the reply starts in ``input_ids`` (OpenAI's penalties count the
    reply's tokens only)."""
    from transformers import LogitsProcessorList

    extra = LogitsProcessorList()
    if settings.presence_penalty or settings.frequency_penalty:
        extra.append(_ReplyPenalties(settings, prompt_length))
    penalties = {"repetition_penalty": settings.repetition_penalty, "logits_processor": extra}
    if settings.temperature <= 0:  # greedy; None silences the sampling defaults
        return {
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            **penalties,
        }
    return {
        "do_sample": True,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,  # 0: off
        "min_p": settings.min_p or None,
        **penalties,
    }


def _seeded(generate, seed: int | None, **kwargs):
    """``generate(**kwargs)``, sampling from torch's generator seeded by ``seed`` (when one
    is given): ``generate()`` takes no generator of its own."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    return generate(**kwargs)


class _ReplyPenalties:
    """OpenAI's presence and frequency penalties, a transformers logits processor:
    ``logit - presence × [count > 0] - frequency × count``, counting each token in the reply so
    far (the ids after the prompt's ``prompt_length``). transformers has none of its own."""

    def __init__(self, settings: GenerationSettings, prompt_length: int):
        self.presence, self.frequency = settings.presence_penalty, settings.frequency_penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        import torch

        reply = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _processors(settings: GenerationSettings, prompt_length: int) -> Any:
    """A sequence's logits processors, in transformers' own order: penalties, then
    temperature, top-k, top-p and min-p (these last only when sampling). Empty for plain
    greedy decoding."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chain = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.presence_penalty or settings.frequency_penalty:
        chain.append(_ReplyPenalties(settings, prompt_length))
    if settings.temperature > 0:
        chain.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            chain.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            chain.append(TopPLogitsWarper(settings.top_p))
        if settings.min_p > 0:
            chain.append(MinPLogitsWarper(settings.min_p))
    return chain


class _Plain:
    """Lets TokenLoss score a model without an adapter (the --compare-base model)."""

    def __init__(self, model):
        self.model = model

    def get_base_model(self):
        return self.model
