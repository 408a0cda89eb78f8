"""Training: config defaults, data mixtures, the jitted step, the loop, checkpoints, placement."""
