"""Allow ``python -m qwen_mlx`` as an alias of the ``qwen-mlx`` console script."""

from qwen_mlx.cli import main

main()
