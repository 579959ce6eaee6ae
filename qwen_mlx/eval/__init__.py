"""``qwen-mlx eval``: answers scored, judged and reported; refusals and general drift."""
