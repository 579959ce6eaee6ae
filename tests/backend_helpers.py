"""Models the backend tests build by hand (a helper module, not a test module)."""

from __future__ import annotations

from qwen_mlx.config import ALL_LINEAR


def mlx_lora_model(model_dir, seed: int = 0):
    """``model_dir`` loaded by the MLX backend in fp32, with LoRA (rank 8, alpha 16) on every
    linear layer and a non-zero B so the adapter matters; in eval mode."""
    import mlx.core as mx

    from qwen_mlx.backends import mlx_model

    model, _ = mlx_model.load_base(model_dir, "none")
    model.set_dtype(mx.float32)
    mlx_model.add_lora(model, ALL_LINEAR, rank=8, alpha=16, dropout=0.0, seed=seed)
    for layer in mlx_model.lora_layers(model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    return model.eval()
