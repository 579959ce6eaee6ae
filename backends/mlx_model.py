"""MLX model side of the mlx backend: load (and quantize) the base, add LoRA, packed loss.

Loading goes through mlx-lm's own loader, so any folder mlx-lm reads works, including
pre-quantized mlx-community ones. ``4bit``/``8bit`` quantize the frozen base in memory
(group size 64) for QLoRA. LoRA is mlx-lm's ``LoRALinear``: ``y = Wx + scale·(drop(x) A) B``
with ``scale = alpha / r``, ``lora_a`` (in, r) and ``lora_b`` (r, out), i.e. PEFT's math
with transposed matrices, so the canonical adapter is A = lora_a.T and B = lora_b.T.

Packed rows: mlx-lm's models build a plain causal mask inside ``model.model(...)``, so the
forward here runs the decoder layers itself with a block-diagonal causal mask made from the
segment ids. Positions keep counting across the samples of a row; RoPE only sees relative
positions, and under that mask no token attends across a sample, so this is exact.

Loss: only target tokens (``loss_mask[t] == 1``, predicted from position ``t - 1``) go
through the LM head, in chunks recomputed in the backward pass, so the fp32 logits of a
whole row (rows × 151,936 for Qwen) never exist at once. Preference objectives (DPO, ORPO)
take each sample's summed answer log-prob instead (:func:`sample_logps`): the same chunks,
their per-token log-probs summed per sample through a one-hot (targets × samples) matrix, both
sizes bucketed so that few graphs are compiled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from qwen_mlx import memory
from qwen_mlx.errors import UserError

GROUP_SIZE = 64
BITS = {"4bit": 4, "8bit": 8}
# Target rows per LM-head chunk: 1024 × 151,936 fp32 logits ≈ 0.6 GB (the memory estimate
# counts on it).
LOSS_CHUNK = memory.LOSS_CHUNK
PAD_TO = 32  # row lengths are padded to a multiple of this: fewer shapes, fewer recompiles


# ---------------------------------------------------------------- loading


def _quantizable(_path: str, module: nn.Module) -> bool:
    """Linear and embedding layers whose input width splits into whole groups."""
    return isinstance(module, (nn.Linear, nn.Embedding)) and (
        module.weight.shape[-1] % GROUP_SIZE == 0
    )


def stored_quantization(model_dir: str | Path, requested: str) -> tuple[str, str | None]:
    """The quantization a run trains with (a pre-quantized folder's own, else ``requested``)
    and a note when the folder overrides the config; never raises (``check`` plans too)."""
    from qwen_mlx.model_files import read_model_config

    try:
        stored = read_model_config(Path(model_dir)).get("quantization")
    except (OSError, ValueError):
        return requested, None
    if not isinstance(stored, dict):
        return requested, None
    bits = stored.get("bits")
    note = (
        f"{model_dir} is already quantized ({bits}-bit); training on it as "
        f"stored (model.quantization: {requested} does not apply)"
    )
    return ("8bit" if bits == 8 else "4bit"), note


def load_base(model_dir: str | Path, quantization: str) -> tuple[nn.Module, str | None]:
    """The frozen base (quantized per ``quantization``) and a note when that was not done."""
    from mlx_lm.utils import load_model

    # Lazy: each weight is read, cast and quantized on its own, so a 3B base never sits in
    # memory at full width (6 GB in bf16) on the way to 4-bit (1.7 GB).
    model, _ = load_model(Path(model_dir), lazy=True)
    if mx.default_device() == mx.cpu:
        # MLX's CPU kernels emulate bf16 (its quantized matmul is ~10× slower than in fp32);
        # fp32 is also what the torch backend uses on a CPU. Metal keeps the stored dtype.
        model.set_dtype(mx.float32)
    _, note = stored_quantization(model_dir, quantization)
    if note is None and quantization in BITS:
        nn.quantize(model, GROUP_SIZE, BITS[quantization], class_predicate=_quantizable)
    for _, weight in tree_flatten(model.parameters()):  # one at a time: see lazy above
        mx.eval(weight)
    model.freeze()
    return model, note


def add_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int
) -> int:
    """Put LoRA on every linear layer named in ``targets``; return how many got one.

    The init is seeded: A is uniform in ±1/√in (PEFT's kaiming-uniform with a=√5), B is 0.
    """
    mx.random.seed(seed)
    wrapped = [
        (name, LoRALinear.from_base(module, r=rank, dropout=dropout, scale=alpha / rank))
        for name, module in _targets(model, targets)
    ]
    if not wrapped:
        raise UserError(
            f"none of lora.target_modules {targets} is a linear layer of this model; "
            "use names like q_proj, v_proj"
        )
    model.update_modules(tree_unflatten(wrapped))
    return len(wrapped)


def _targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets
        and isinstance(module, (nn.Linear, nn.QuantizedLinear))
    ]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---------------------------------------------------------------- canonical adapter


def peft_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The LoRA weights under PEFT's names and shapes: A (r, in), B (out, r), float32."""
    out = {}
    for name, layer in lora_layers(model).items():
        prefix = f"base_model.model.{name}"
        out[f"{prefix}.lora_A.weight"] = np.array(layer.lora_a.T.astype(mx.float32))
        out[f"{prefix}.lora_B.weight"] = np.array(layer.lora_b.T.astype(mx.float32))
    return out


def load_peft_weights(model: nn.Module, adapter_dir: Path) -> None:
    """Set the model's LoRA layers from a PEFT (or mlx-lm) adapter folder, exactly."""
    from qwen_mlx.adapters import load_adapter

    layers = lora_layers(model)
    for name, pair in load_adapter(adapter_dir).pairs.items():
        if name not in layers:
            raise UserError(f"{adapter_dir}: {name} has no LoRA layer in this run's model")
        layers[name].lora_a = mx.array(pair.a.T)
        layers[name].lora_b = mx.array(pair.b.T)


def apply_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Add a trained adapter (PEFT or mlx-lm format) to ``model`` for inference."""
    from qwen_mlx.adapters import load_adapter

    modules = dict(model.named_modules())
    wrapped = []
    for name, pair in load_adapter(adapter_dir).pairs.items():
        base = modules.get(name)
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise UserError(f"{adapter_dir}: {name} is not a linear layer of the base model")
        layer = LoRALinear.from_base(base, r=pair.rank, dropout=0.0, scale=pair.scale)
        layer.lora_a, layer.lora_b = mx.array(pair.a.T), mx.array(pair.b.T)
        wrapped.append((name, layer))
    model.update_modules(tree_unflatten(wrapped))
    model.eval()


# ---------------------------------------------------------------- packed forward and loss


def block_causal_mask(segment_ids: mx.array | None) -> mx.array | str:
    """(batch, 1, L, L) bool: token i sees token j ≤ i of its own sample (or padding run).

    ``None`` stands for rows that hold one sample each (padding only at the end): a plain
    causal mask is exact for them, and attention kernels have a faster path for it.
    """
    if segment_ids is None:
        return "causal"
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = mx.arange(length)[:, None] >= mx.arange(length)[None, :]
    return (same & causal)[:, None]


def hidden_states(
    model: nn.Module, input_ids: mx.array, mask: mx.array | str, recompute: int = 0
) -> mx.array:
    """The final-norm hidden states of ``model`` under an explicit attention mask; the first
    ``recompute`` layers recompute their activations in the backward pass."""
    inner = model.model
    h = inner.embed_tokens(input_ids)
    for i, layer in enumerate(inner.layers):
        h = _recomputed(layer, h, mask) if i < recompute else layer(h, mask, None)
    return inner.norm(h)


def _recomputed(layer: nn.Module, h: mx.array, mask: mx.array | str) -> mx.array:
    """Run ``layer`` keeping only its input; its activations are recomputed for backward."""

    def run(params: dict, x: mx.array) -> mx.array:
        layer.update(params)
        return layer(x, mask, None)  # the bool mask is closed over: it has no gradient

    return mx.checkpoint(run)(layer.trainable_parameters(), h)


def lm_head(model: nn.Module) -> Any:
    head = getattr(model, "lm_head", None)
    return head if head is not None else model.model.embed_tokens.as_linear


def logits(model: nn.Module, input_ids: mx.array, segment_ids: mx.array) -> mx.array:
    """Full logits of packed rows (for tests and checks; training never builds these)."""
    return lm_head(model)(hidden_states(model, input_ids, block_causal_mask(segment_ids)))


def target_loss(
    model: nn.Module,
    input_ids: mx.array,
    segment_ids: mx.array | None,
    positions: mx.array,
    labels: mx.array,
    weights: mx.array,
    recompute: int = 0,
) -> mx.array:
    """Summed cross-entropy of ``labels`` predicted from the flat hidden ``positions``.

    ``weights`` is 1 for a real target and 0 for the padding that rounds the number of
    targets up to a bucket size (see :func:`targets`). ``segment_ids`` is None for rows of
    one sample each (see :func:`block_causal_mask`).
    """
    h = hidden_states(model, input_ids, block_causal_mask(segment_ids), recompute)
    h = h.reshape(-1, h.shape[-1])[positions]
    head = lm_head(model)
    # One chunk's logits are alive in the backward pass anyway; with several, recomputing
    # each chunk in the backward pass keeps only one chunk's logits alive at a time.
    several = positions.shape[0] > LOSS_CHUNK
    total = mx.array(0.0, dtype=mx.float32)
    for start in range(0, positions.shape[0], LOSS_CHUNK):
        part = slice(start, start + LOSS_CHUNK)
        lab, wei = labels[part], weights[part]

        def chunk(x: mx.array, lab=lab, wei=wei) -> mx.array:
            ce = nn.losses.cross_entropy(head(x).astype(mx.float32), lab, reduction="none")
            return (ce * wei).sum()

        total = total + (mx.checkpoint(chunk) if several else chunk)(h[part])
    return total


def sample_logps(
    model: nn.Module,
    input_ids: mx.array,
    segment_ids: mx.array,
    positions: mx.array,
    labels: mx.array,
    onehot: mx.array,
    recompute: int = 0,
) -> mx.array:
    """Each sample's summed log-prob of its targets: ``onehot[t, s]`` is 1 where target ``t``
    belongs to sample ``s`` (0 for the padding targets and samples)."""
    h = hidden_states(model, input_ids, block_causal_mask(segment_ids), recompute)
    h = h.reshape(-1, h.shape[-1])[positions]
    head = lm_head(model)
    several = positions.shape[0] > LOSS_CHUNK
    total = mx.zeros((onehot.shape[1],), dtype=mx.float32)
    for start in range(0, positions.shape[0], LOSS_CHUNK):
        part = slice(start, start + LOSS_CHUNK)
        lab, owner = labels[part], onehot[part]

        def chunk(x: mx.array, lab=lab, owner=owner) -> mx.array:
            logps = -nn.losses.cross_entropy(head(x).astype(mx.float32), lab, reduction="none")
            return logps @ owner

        total = total + (mx.checkpoint(chunk) if several else chunk)(h[part])
    return total


def pair_device_batch(batch: dict[str, np.ndarray], layout) -> tuple[mx.array, ...]:
    """The arrays :func:`sample_logps` takes, then the layout's per-sample token counts,
    reference log-probs and per-pair weights (a :class:`qwen_mlx.objectives.PairLayout`)."""
    batch = pad_batch(batch)
    positions, labels, _ = targets(batch["input_ids"], batch["loss_mask"])
    onehot = np.zeros((len(positions), len(layout.tokens)), dtype=np.float32)
    found = len(layout.sample_of_target)
    onehot[np.arange(found), layout.sample_of_target] = 1.0
    arrays = (batch["input_ids"], batch["segment_ids"], positions, labels, onehot)
    return tuple(mx.array(a) for a in (*arrays, layout.tokens, layout.ref, layout.weight))


def _bucket(n: int, cap: int) -> int:
    """``n`` rounded up to one of at most 16 sizes per row shape: few graphs to compile."""
    step = max(32, cap // 16)
    return min(cap, -(-max(n, 1) // step) * step)


def targets(input_ids: np.ndarray, loss_mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Flat hidden positions, labels and weights of the targets of a (batch, L) batch."""
    batch, length = input_ids.shape
    rows, cols = np.nonzero(loss_mask[:, 1:])
    size = _bucket(len(rows), batch * length)
    positions = np.zeros(size, dtype=np.int32)
    labels = np.zeros(size, dtype=np.int32)
    weights = np.zeros(size, dtype=np.float32)
    positions[: len(rows)] = rows * length + cols
    labels[: len(rows)] = input_ids[rows, cols + 1]
    weights[: len(rows)] = 1.0
    return positions, labels, weights


def pad_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pad the rows to a multiple of PAD_TO with non-target padding (segment 0)."""
    length = batch["input_ids"].shape[1]
    extra = -length % PAD_TO
    if not extra:
        return batch
    return {k: np.pad(v, ((0, 0), (0, extra))) for k, v in batch.items()}


def device_batch(batch: dict[str, np.ndarray]) -> tuple[mx.array | None, ...]:
    """The arrays :func:`target_loss` takes, from one collated batch."""
    batch = pad_batch(batch)
    positions, labels, weights = targets(batch["input_ids"], batch["loss_mask"])
    # Rows are padded at the end, so segment ids ≤ 1 mean one sample per row.
    segments = batch["segment_ids"] if batch["segment_ids"].max() > 1 else None
    arrays = (batch["input_ids"], segments, positions, labels, weights)
    return tuple(None if a is None else mx.array(a) for a in arrays)
