"""Shared behaviour of the command-line tools: quiet library logging, clear exits on bad input."""

import contextlib
import logging
import sys

from absl import logging as absl_logging


def quiet_libraries() -> None:
    """Show casa_jax INFO messages; show only warnings from orbax, jax and the rest."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("casa_jax").setLevel(logging.INFO)


@contextlib.contextmanager
def exit_on_bad_input():
    """Turn a bad checkpoint, config or media input into one ``error: ...`` line on stderr and exit status 2."""
    from casa_jax.checkpoints.hf_files import CheckpointError
    from casa_jax.model.config import ConfigError
    from casa_jax.processing import InputError
    try:
        yield
    except (CheckpointError, ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
