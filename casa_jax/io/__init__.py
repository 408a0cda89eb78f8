"""Checkpoint formats: Hugging Face safetensors, GGUF, orbax, and trained casa-jax models."""
