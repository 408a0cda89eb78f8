"""Console logging for the command-line tools: our progress messages, not the libraries' chatter."""

import logging

from absl import logging as absl_logging


def quiet_libraries() -> None:
    """Show casa_jax INFO messages; show only warnings from orbax, jax and the rest."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("casa_jax").setLevel(logging.INFO)
