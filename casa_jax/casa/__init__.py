"""CASA: safety tokens, safety attention, training objectives and LoRA for the Qwen2.5 decoder."""
