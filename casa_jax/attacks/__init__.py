"""Attack builders: deterministic functions from a harmful request to model inputs (text, image, audio,
assistant prefill). They exist to measure attack success rates; they never generate harmful content."""
