"""The README's main job in two sizes: a real model (SmolLM2-135M-Instruct, ``smollm2``) and a random
tiny Qwen2.5-Omni thinker that exercises every modality in a few minutes (``tiny_thinker``)."""
