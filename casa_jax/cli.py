"""Shared behaviour of the command-line tools: quiet library logging, one clear line and exit status 2 on
bad input (flags included), ``--help`` that exits 0, config files found from any directory."""

import contextlib
import logging
import os
import sys

# transformers warns on import that PyTorch is missing (it is test-only here): not on every command.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")


def quiet_libraries() -> None:
    """Show casa_jax INFO messages; show only warnings from orbax, jax and the rest."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("casa_jax").setLevel(logging.INFO)


@contextlib.contextmanager
def exit_on_bad_input():
    """Turn a bad checkpoint, config or media input into one ``error: ...`` line on stderr and exit status 2."""
    from casa_jax.io.hf_files import CheckpointError
    from casa_jax.model.config import ConfigError
    from casa_jax.processing import InputError
    try:
        yield
    except (CheckpointError, ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def resolve_config_path(arg: str) -> str:
    """``--config=configs/x.py[:arg]`` as the README writes it works from any directory: a relative path
    missing from the working directory is looked up beside this checkout (editable installs)."""
    if not arg.startswith("--config="):
        return arg
    path, sep, rest = arg[len("--config="):].partition(":")
    if path and not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(REPO_ROOT, path)
        if os.path.isfile(candidate):
            if REPO_ROOT not in sys.path:  # configs import their shared parts as `configs.*`
                sys.path.append(REPO_ROOT)
            return f"--config={candidate}{sep}{rest}"
    return arg


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config override as one ``error:`` line (exit 2) instead of a
    traceback or "FATAL Flags parsing error", and --help exiting 0."""
    argv = [argv[0]] + [resolve_config_path(a) for a in argv[1:]]
    wants_help = any(a in HELP_FLAGS or a.split("=")[0] in HELP_FLAGS for a in argv[1:])
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        if wants_help:
            sys.exit(0)
        raise e
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _bad_flag(e)


def _bad_flag(e: Exception) -> None:
    message = str(e).strip()
    if isinstance(e, (AttributeError, KeyError)):
        message = f"unknown config key {message.strip(chr(34))}: check the --config.KEY=VALUE overrides"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def define_config_file(name: str, default: str | None, help_string: str) -> None:
    """``config_flags.DEFINE_config_file`` (locked config); ml_collections applies ``--config.KEY=VALUE``
    overrides of a default config while defining the flag, so an unknown key fails here: one line, exit 2."""
    from ml_collections import config_flags
    sys.argv[1:] = [resolve_config_path(a) for a in sys.argv[1:]]
    try:
        config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _bad_flag(e)


def run(main) -> None:
    """``app.run(main)`` with this module's flag parsing."""
    app.run(main, flags_parser=_parse_flags)
