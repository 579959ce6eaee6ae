"""GGUF export and fuse: an adapter merged into its base, a model into a GGUF file and its
ollama Modelfile."""
