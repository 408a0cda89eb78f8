"""The embedded tiny default: a 2-layer Qwen2.5-style decoder that runs in seconds on a CPU.

Random-initialised; it shows the mechanics (conversion, decoding, later CASA training), not quality.
The values live in ``casa_jax.tiny.TINY_MODEL`` so the installed package carries them too.
"""

import ml_collections

from casa_jax.tiny import TINY_MODEL, TINY_SEED


def get_config():
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(TINY_MODEL)
    config.seed = TINY_SEED
    return config
