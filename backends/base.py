"""The ``Backend`` protocol every trainer implements, and the small types it exchanges.

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


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why (shown by ``check`` and ``--backend``)."""

    ok: bool
    reason: str
    device: str = "cpu"
    packages: dict[str, str] = field(default_factory=dict)  # name -> version found


@dataclass
class GenerationSettings:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)


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
    """What ``train``, ``eval``, ``chat`` and ``serve`` need from a trainer."""

    name: str

    def availability(self) -> Availability:
        """Cheap probe: can this backend run on this machine? (Never raises.)"""
        ...

    def train(self, config: Config, run_dir: Path, resume: bool = False) -> TrainResult:
        """Train LoRA per ``config``; write the PEFT-format adapter into ``run_dir/adapter``."""
        ...

    def load(self, model_dir: Path, adapter_dir: Path | None = None) -> Any:
        """Load the base model (plus adapter) for inference; the handle goes to ``generate``."""
        ...

    def generate(
        self, loaded: Any, prompt_ids: list[int], settings: GenerationSettings
    ) -> Iterator[str]:
        """The reply to a prompt (token ids, see ``qwen_mlx.chat_template``): one text piece per
        generated token (empty while a character is incomplete), ending before the model's
        end-of-turn token or after ``settings.max_tokens`` tokens; closing the iterator stops
        generation."""
        ...

    def score(self, loaded: Any, samples: list) -> tuple[float, int]:
        """Summed loss over the target tokens of tokenized samples, and their count."""
        ...
