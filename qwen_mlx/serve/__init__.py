"""``qwen-mlx serve``: the OpenAI-compatible API, its guards and the chat page."""

# Requests ``serve`` decodes together unless --max-concurrent says otherwise: decoding on a Mac
# or a GPU is bound by memory bandwidth, so 8 sequences cost little more than one.
DEFAULT_MAX_CONCURRENT = 8
