"""``qwen-mlx serve``: the OpenAI-compatible API, its guards and the chat page."""
