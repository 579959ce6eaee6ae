"""MLX inference: a base model (plus a PEFT or mlx-lm adapter) generating with mlx-lm.

The tokenizer is the model folder's own, loaded once through transformers (as training
and every other engine load it) and handed to mlx-lm wrapped, so prompts, stop tokens and
decoding are the same as on the torch backend. Several prompts are generated together
(``pieces_batch``) by mlx-lm's ``BatchGenerator`` (left-padded prompts in a batched KV cache),
each sequence leaving the batch at its own end of turn or ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from qwen_mlx.backends.base import GenerationSettings, token_texts
from qwen_mlx.inference import HFEngine


class MLXEngine(HFEngine):
    """An :class:`qwen_mlx.inference.Engine` on MLX."""

    backend_name = "mlx"

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None):
        from mlx_lm.tokenizer_utils import TokenizerWrapper
        from mlx_lm.utils import load_model

        from qwen_mlx.backends.mlx_model import apply_adapter

        super().__init__(model_dir)
        self.model, _ = load_model(Path(model_dir))
        if adapter_dir is not None:
            apply_adapter(self.model, Path(adapter_dir))
        self.model.eval()
        self.has_adapter = adapter_dir is not None
        self.wrapped = TokenizerWrapper(self.tokenizer, eos_token_ids=self.end_ids)

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside, the model answers as its base: every LoRA layer's scale is 0, which
        leaves exactly the base layer's output (``Wx + 0``)."""
        from mlx_lm.tuner.lora import LoRALinear

        layers = [m for _, m in self.model.named_modules() if isinstance(m, LoRALinear)]
        scales = [layer.scale for layer in layers]
        for layer in layers:
            layer.scale = 0.0
        try:
            yield
        finally:
            for layer, scale in zip(layers, scales, strict=True):
                layer.scale = scale

    def pieces(self, prompt_ids: list[int], settings: GenerationSettings):
        """One text piece per generated token of the reply (greedy when temperature is 0)."""
        from mlx_lm.generate import stream_generate

        responses = stream_generate(
            self.model,
            self.wrapped,
            prompt_ids,
            max_tokens=settings.max_tokens,
            sampler=sampler(settings),
            logits_processors=logits_processors(settings, len(prompt_ids)),
        )
        # The last response carries the end-of-turn token when the model stopped by itself.
        tokens = (r.token for r in responses if r.finish_reason != "stop")
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        try:
            yield from token_texts(tokens, decode)
        finally:  # stop generating now, not when the garbage collector gets to it
            responses.close()

    def pieces_batch(self, prompts: list[list[int]], settings: GenerationSettings):
        """The pieces of several prompts' replies, generated together."""
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(
            self.model,
            max_tokens=settings.max_tokens,
            stop_tokens=[[token] for token in sorted(self.end_ids)],
            completion_batch_size=len(prompts),
            prefill_batch_size=len(prompts),
        )
        try:
            uids = generator.insert(
                prompts,
                samplers=[sampler(settings) for _ in prompts],
                logits_processors=[logits_processors(settings, len(p)) for p in prompts],
            )
            tokens: dict[int, list[int]] = {uid: [] for uid in uids}
            while responses := generator.next_generated():
                for r in responses:
                    if r.finish_reason != "stop":  # "stop": the end-of-turn token itself
                        tokens[r.uid].append(r.token)
        finally:
            generator.close()
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        return [list(token_texts(tokens[uid], decode)) for uid in uids]

    def decoder(self) -> MLXDecoder:
        """Continuous batching over this model (``serve``)."""
        return MLXDecoder(self)

    def score(self, samples: list) -> tuple[float, int]:
        """Summed target-token loss of tokenized samples and their count (test loss)."""
        from qwen_mlx.backends.mlx_model import device_batch, target_loss
        from qwen_mlx.tokens import collate, unpacked

        total, count = 0.0, 0
        for row in unpacked(samples, 0):
            batch = collate([row], 0)
            total += target_loss(self.model, *device_batch(batch)).item()
            count += int(batch["loss_mask"][:, 1:].sum())
        return total, count

    def target_logits(self, sample):
        """float32 logits (numpy, targets × vocabulary) at the positions that predict the
        sample's target tokens."""
        import mlx.core as mx
        import numpy as np

        logits = self.model(mx.array([sample.input_ids]))[0, :-1].astype(mx.float32)
        targets = np.flatnonzero(np.asarray(sample.loss_mask[1:]))
        return np.array(logits[mx.array(targets)])


UNBOUNDED = 1 << 16
WHOLE_CONTEXT = 1 << 30  # a penalty's context size: every token so far


def sampler(settings: GenerationSettings):
    """A sequence's sampler: greedy at temperature 0; else mlx-lm's top-p, min-p and top-k
    filters (as ``make_sampler`` chains them), then a draw with the sequence's own random
    key (from ``seed``, else fresh), so what it samples does not depend on the batch."""
    import secrets

    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if settings.temperature <= 0:
        return greedy_sampler
    filters = []
    if 0 < settings.top_p < 1.0:
        filters.append(partial(apply_top_p, top_p=settings.top_p))
    if settings.min_p > 0:
        filters.append(partial(apply_min_p, min_p=settings.min_p))
    if settings.top_k > 0:
        filters.append(partial(apply_top_k, top_k=settings.top_k))
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    key = [mx.random.key(seed)]
    scale = 1.0 / settings.temperature

    def sample(logprobs):
        for keep in filters:
            logprobs = keep(logprobs)
        key[0], draw = mx.random.split(key[0])
        return mx.random.categorical(logprobs * scale, key=draw)

    return sample


def logits_processors(settings: GenerationSettings, prompt_length: int) -> list:
    """A sequence's penalties as mlx-lm logits processors: ``repetition_penalty`` over every
    token so far (prompt and reply), OpenAI's presence and frequency penalties over the
    reply's tokens only (mlx-lm hands a processor the prompt and the reply together)."""
    from mlx_lm.sample_utils import make_logits_processors

    whole = make_logits_processors(
        repetition_penalty=settings.repetition_penalty,
        repetition_context_size=WHOLE_CONTEXT,
    )
    whole = whole if settings.repetition_penalty != 1.0 else []
    reply = make_logits_processors(
        presence_penalty=settings.presence_penalty,
        presence_context_size=WHOLE_CONTEXT,
        frequency_penalty=settings.frequency_penalty,
        frequency_context_size=WHOLE_CONTEXT,
    )
    return whole + [partial(_on_reply, processor, prompt_length) for processor in reply]


def _on_reply(processor, prompt_length: int, tokens, logits):
    return processor(tokens[prompt_length:], logits)


class MLXDecoder:
    """Continuous batching on MLX (:class:`qwen_mlx.inference.Decoder`): mlx-lm's
    ``BatchGenerator``, which reads joining prompts between decode steps (a long one in
    ``prefill_step_size`` pieces, decoding the others in between) and drops a sequence at its
    end of turn or ``max_tokens``; each sequence samples with its own settings."""

    def __init__(self, engine: MLXEngine, prefill_step_size: int = 512):
        from mlx_lm.generate import BatchGenerator

        self.decode = partial(engine.tokenizer.decode, skip_special_tokens=True)
        self._generator = BatchGenerator(
            engine.model,
            stop_tokens=[[token] for token in sorted(engine.end_ids)],
            prefill_step_size=prefill_step_size,
            # no bound of its own: the caller (serve's --max-concurrent) decides how many join
            completion_batch_size=UNBOUNDED,
            prefill_batch_size=UNBOUNDED,
        )
        self._seqs: set[int] = set()

    def __len__(self) -> int:
        return len(self._seqs)

    def join(self, prompt_ids: list[int], settings: GenerationSettings) -> int:
        # A greedy sequence's sampler is None: the batch's shared greedy sampler, one call
        # for all greedy sequences (after each sequence's own penalties, if any).
        (seq,) = self._generator.insert(
            [prompt_ids],
            [settings.max_tokens],
            samplers=[None if settings.temperature <= 0 else sampler(settings)],
            logits_processors=[logits_processors(settings, len(prompt_ids))],
        )
        self._seqs.add(seq)
        return seq

    def leave(self, seq: int) -> None:
        if seq in self._seqs:
            self._seqs.discard(seq)
            self._generator.remove([seq])

    def step(self) -> list:
        from qwen_mlx.inference import Step

        steps = []
        for r in self._generator.next_generated() if self._seqs else []:
            done = r.finish_reason is not None
            if done:
                self._seqs.discard(r.uid)
            # "stop": the token is the end of turn itself, which is no part of the reply
            steps.append(Step(r.uid, None if r.finish_reason == "stop" else r.token, done))
        return steps

    def close(self) -> None:
        self._generator.close()
