"""Test set-up: simulate an 8-device pod on the CPU (must happen before jax is imported)."""

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

importlib.import_module("jax")  # reads its configuration now: the cache below is for the subprocesses only


def _share_compiles_between_subprocesses():
    """The many CLI subprocesses (train, resume, evaluate, demo) compile the same steps again and again:
    they share one persistent XLA compilation cache, new for each test session and removed after it. The
    test process itself keeps compiling in memory (jax has read its configuration already), so what it
    measures of compiled executables (``sizing.compiled_step_memory``) never comes from the cache. A size
    limit turns on the cache's file lock, for the tests that run several processes at once."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="casa-jax-tests-xla-cache-")
        atexit.register(shutil.rmtree, cache, True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


_share_compiles_between_subprocesses()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


TINY_CASA_CONFIG = os.path.join(ROOT, "configs", "casa_tiny.py")
TINY_CASA_STEPS = 40


def tiny_casa_train_cmd(workdir, *extra) -> list[str]:
    """The train CLI on the tiny CASA config: 40 steps, a checkpoint every 10, metrics every step, held-out
    eval every 20. The kill-and-resume tests (local disk and bucket) run it and compare with one run of it."""
    return [sys.executable, "-m", "casa_jax.train", f"--config={TINY_CASA_CONFIG}:casa", f"--workdir={workdir}",
            f"--config.num_train_steps={TINY_CASA_STEPS}", "--config.checkpoint_every_steps=10",
            "--config.log_every_steps=1", "--config.eval_every_steps=20", "--config.data.num_harmful=80",
            "--config.data.heldout_per_class=20", *extra]


@pytest.fixture(scope="session")
def straight_casa_run(tmp_path_factory):
    """The workdir of one uninterrupted ``tiny_casa_train_cmd`` run on the 8 simulated devices, shared by
    the kill-and-resume tests (each compares its resumed run's metrics with this one's)."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    r = subprocess.run(tiny_casa_train_cmd(workdir), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def tiny_casa_model(tmp_path_factory):
    """The workdir of a 200-step tiny CASA run (one device) with its threshold calibrated on held-out
    prompts: it tells held-out harmful from benign prompts. test_casa_cli checks it; the server tests serve it."""
    workdir = tmp_path_factory.mktemp("tiny_casa") / "casa"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "casa_jax.train", f"--config={TINY_CASA_CONFIG}:casa",
                        f"--workdir={workdir}", "--config.num_train_steps=200", "--config.log_every_steps=20",
                        "--config.calibrate_threshold=True"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def gcs():
    """A local Cloud Storage emulator (tests/gcs_emulator.py, no network) with buckets ``casa`` and ``demo``,
    this process pointed at it (before its first gs:// use: gcsfs caches its filesystem) and the env set
    for child processes; restored at the end of the session."""
    from gcs_emulator import GcsEmulator
    with GcsEmulator(("casa", "demo")) as emulator:
        saved = {k: os.environ.get(k) for k in emulator.env}
        os.environ.update(emulator.env)
        import fsspec
        # anonymous, and no cached listings: this process watches a bucket that another one writes
        fsspec.config.conf.setdefault("gcs", {}).update(token="anon", use_listings_cache=False)
        yield emulator
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def espeak_or_skip() -> bool:
    """True when espeak-ng can speak; without it the test skips, unless CASA_REQUIRE_ESPEAK=1 (CI sets it
    after installing espeak-ng), where a missing TTS is a failure, never a silent skip."""
    from casa_jax.attacks.audio import espeak_available
    if espeak_available():
        return True
    if os.environ.get("CASA_REQUIRE_ESPEAK") == "1":
        pytest.fail("CASA_REQUIRE_ESPEAK=1 but espeak-ng is not installed")
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
