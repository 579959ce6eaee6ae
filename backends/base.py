"""The ``Backend`` protocol every trainer implements, and the small types it exchanges.

A run is orchestrated once, in :func:`qwen_mlx.training_run.train`; a backend answers four
questions for it and for ``check``, ``eval``, ``chat`` and ``serve``:

- ``availability()``: can it run here at all (packages, device)? Cheap, never raises.
- ``plan(cfg)``: what a run of ``cfg`` would do here (device, ranks, the quantization,
  attention and kernels really used, device memory, notes); loads no model.
- ``trainer(cfg, plan)``: the loop's :class:`~qwen_mlx.loop.Hooks` for a loaded base with
  LoRA and an optimizer; ``close()`` ends what it started (DDP).
- ``engine(model_dir, adapter_dir)``: an :class:`~qwen_mlx.inference.Engine` for inference.

A backend is a plain class (no shared base class): the registry in ``__init__`` imports it
lazily by name, so ``import qwen_mlx`` never pulls in torch or mlx.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from qwen_mlx.config import Config
    from qwen_mlx.inference import Engine
    from qwen_mlx.loop import Hooks


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why (shown by ``check`` and ``--backend``)."""

    ok: bool
    reason: str
    device: str = "cpu"
    packages: dict[str, str] = field(default_factory=dict)  # name -> version found


@dataclass
class DevicePlan:
    """How a training run of a config uses this machine (device, ranks, the quantization
    really used, memory), decided by ``Backend.plan()`` before anything is loaded."""

    device: str  # what the user is told, e.g. "cuda:0 ×2 (DDP)" or "MLX on CPU"
    quantization: str  # the base's quantization really used ("none" where it cannot be)
    fp32: bool  # weights and activations in float32 (CPU paths): the memory estimate needs it
    device_memory: int | None  # bytes the run may use, when known
    rank: int = 0
    world_size: int = 1
    facts: list[tuple[str, str]] = field(default_factory=list)  # (title, detail) for check
    notes: list[str] = field(default_factory=list)  # where the run differs from the config
    settings: Any = None  # the backend's own typed settings, which its trainer() reads
    tight_memory: bool = False  # set by training_run when the estimate is near the limit

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and talks to the user."""
        return self.rank == 0


@dataclass
class GenerationSettings:
    """How a reply is decoded. The defaults decode exactly by ``temperature`` and ``top_p``:
    no top-k, min-p or penalty unless asked (docs/serve.md states each option's meaning)."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    top_k: int = 0  # 0: no top-k
    min_p: float = 0.0  # 0: no min-p
    # Multiplicative, over the prompt and the reply (transformers' and vLLM's meaning).
    repetition_penalty: float = 1.0
    # Additive, over the reply's tokens (OpenAI's meaning): once per token seen, per time seen.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # the same seed, settings and prompt: the same reply

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (greedy replies too)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def token_texts(tokens: Iterable[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """One text piece per token. A character split across byte-level tokens decodes to U+FFFD
    until its last byte arrives, so its tokens give empty pieces until then; only the tokens
    since the last whole character are decoded again, which keeps long replies linear."""
    pending: list[int] = []
    for token in tokens:
        pending.append(token)
        text = decode(pending)
        if text.endswith("\ufffd"):
            yield ""
            continue
        yield text
        pending = []


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int


@runtime_checkable
class Backend(Protocol):
    """What training, ``check``, ``eval``, ``chat`` and ``serve`` need from a backend."""

    name: str

    def availability(self) -> Availability:
        """Cheap probe: can this backend run on this machine? (Never raises.)"""
        ...

    def plan(self, cfg: Config) -> DevicePlan:
        """How a run of ``cfg`` would go here; loads no model (``check`` shows it)."""
        ...

    def trainer(self, cfg: Config, plan: DevicePlan) -> Hooks:
        """Load the base per ``plan``, add LoRA, build the optimizer: the loop's hooks."""
        ...

    def engine(self, model_dir: Path, adapter_dir: Path | None = None) -> Engine:
        """The base model (plus a PEFT adapter) loaded for inference."""
        ...
