"""Test set-up: simulate an 8-device pod on the CPU (must happen before jax is imported)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


def espeak_or_skip() -> bool:
    """True when espeak-ng can speak; without it the test skips, unless CASA_REQUIRE_ESPEAK=1 (CI sets it
    after installing espeak-ng), where a missing TTS is a failure, never a silent skip."""
    from casa_jax.attacks.audio import espeak_available
    if espeak_available():
        return True
    if os.environ.get("CASA_REQUIRE_ESPEAK") == "1":
        pytest.fail("CASA_REQUIRE_ESPEAK=1 but espeak-ng is not installed")
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
