import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CIFAR_SUBSET = SHARED_DATA / "cifar10-subset" / "cifar-10-binary.tar.gz"

# `jaxnorm` comes from the installed package (`pip install -e .[test]`); `python -m pytest` run in
# the checkout puts it first anyway. Child processes (scripts, workers) get the same code, this
# checkout's, even where another copy is installed or none is.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# Most of the suite's time is compilation, and its tests build the same few steps again and again (a
# new jit for each, in this process and in the scripts it runs). JAX's persistent compilation cache, in
# a folder of this run, compiles each once: set in the environment before JAX is imported, so the
# subprocesses (scripts, workers) read and fill the same cache as this process; so do pytest-xdist's
# workers (`-n 2`, as .ci/run runs it), which find the folder their controller made in the environment.
# A test whose processes are SIGKILLed (possibly mid-write of an entry) gives them a cache of their own:
# see copy_of_cache.
if os.environ.get("JAXNORM_TEST_COMPILE_CACHE", "1") != "0":
    _cache = os.environ.get("JAXNORM_TEST_CACHE_DIR")
    if not (_cache and os.environ.get("PYTEST_XDIST_WORKER")):
        import atexit
        import shutil
        import tempfile

        _cache = tempfile.mkdtemp(prefix="jaxnorm-test-cache-")
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update({"JAXNORM_TEST_CACHE_DIR": _cache, "JAX_COMPILATION_CACHE_DIR": _cache,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

# Compile fast, run slower: the suite's time is mostly compilation, most of which is XLA:CPU optimising
# the code it generates. At level 0 the whole suite takes 40% less CPU time (1,400 s instead of 2,330);
# a tiny 2-epoch run 21 CPU s instead of 38. XLA:CPU's older fusion emitter halves what is left of a
# train step's compilation (2.3 CPU s instead of 4.9 for the tiny CNN; jax 0.10 knows the flag, a
# later XLA may not: drop it then). The page-fault test, which measures optimised code's memory use,
# runs without these flags.
# JAXNORM_TEST_FAST_COMPILE=0 runs the whole suite optimised. Set before any backend starts; the scripts
# the tests run inherit it.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                  if os.environ.get("JAXNORM_TEST_FAST_COMPILE", "1") == "1" else "")
if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS]))

import jax  # noqa: E402

import jaxnorm  # noqa: E402
from jaxnorm.config import Config  # noqa: E402
from jaxnorm.data import synthetic_dataset  # noqa: E402

if os.environ.get("JAXNORM_TEST_COMPILE_CACHE", "1") != "0":  # in case a plugin imported jax before us
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The test process is an entry point like the scripts: one CPU device per core, set up before any
# test starts JAX (in-process tests then see what the scripts see).
jaxnorm.setup_cpu_devices()


def copy_of_cache(path):
    """A private copy of this run's compilation cache at `path` (for processes that are SIGKILLed)."""
    import shutil
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        shutil.copytree(cache, path, dirs_exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_data():
    """64 train / 32 test synthetic 16x16 RGB images: enough to learn from in a few steps."""
    return synthetic_dataset(64, 32, image_shape=(16, 16, 3))


@pytest.fixture
def tiny_config():
    """A small, fast network and schedule for the tiny data."""
    return Config(dataset="synthetic", width=8, transition_width=8, groups=4, batch_size=16, epochs=2,
                  lr=0.05, dropout=0.0, eval_batch_size=32)


@pytest.fixture
def offline(monkeypatch):
    """Downloads go to a closed port on 127.0.0.1 (refused at once), as on a machine without network."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setenv("JAXNORM_CIFAR10_URL", url + "cifar-10-binary.tar.gz")
    monkeypatch.setenv("JAXNORM_MNIST_URL", url)
    return url


def run_script(name, *args, timeout=300, env=None):
    """Run scripts/<name> in a subprocess (`env`: variables to add); returns its CompletedProcess (text)."""
    import subprocess
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
