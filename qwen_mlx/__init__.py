"""qwen-mlx: fine-tune Qwen (Qwen2.5, Qwen3) on your own data and run it locally.

Importing this package is cheap: it never imports torch or mlx. Backends are loaded by
name through :mod:`qwen_mlx.backends` only when a command needs one.
"""

__version__ = "0.1.0"
