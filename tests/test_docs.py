"""The README's commands are the ones CI runs and the ones that exist."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one_verbatim():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "casa_jax.demo" in commands[0] and "pytest" in commands[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert commands[1] in ci
