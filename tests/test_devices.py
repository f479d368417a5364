"""`import jaxnorm` leaves JAX alone; `jaxnorm.setup_cpu_devices()` makes the CPU devices it says."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TEST_XLA_FLAGS, run_script
from jaxnorm.config import ConfigError
from jaxnorm.devices import cpu_device_count

PROBE = """
import json, pkgutil, importlib, sys
import jaxnorm
for module in pkgutil.iter_modules(jaxnorm.__path__):  # every module, as a library user might import them
    importlib.import_module(f"jaxnorm.{module.name}")
import jax
before = jax.config.jax_num_cpu_devices
if "late" in sys.argv:
    jax.devices()  # the backend starts before the setup call
returned = jaxnorm.setup_cpu_devices() if "setup" in sys.argv else "not called"
print(json.dumps({"before": before, "returned": returned, "devices": jax.device_count()}))
"""


def probe(*args, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXNORM_CPU_DEVICES")}
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                            env={**clean, "JAX_PLATFORMS": "cpu", **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_jaxnorm_changes_no_jax_setting():
    import_only = probe(JAXNORM_CPU_DEVICES="3")  # read by the setup only, not on import
    plain_jax = subprocess.run([sys.executable, "-c", "import jax; print(jax.config.jax_num_cpu_devices)"],
                               capture_output=True, text=True, timeout=60)
    assert import_only == {"before": int(plain_jax.stdout), "returned": "not called", "devices": 1}


def test_setup_makes_one_device_per_core_or_the_count_asked_for():
    default = min(os.cpu_count(), 8)
    assert probe("setup") == {"before": -1, "returned": default, "devices": default}
    assert probe("setup", JAXNORM_CPU_DEVICES="3") == {"before": -1, "returned": 3, "devices": 3}


def test_setup_leaves_a_count_forced_by_xla_flags():
    forced = probe("setup", XLA_FLAGS="--xla_force_host_platform_device_count=5", JAXNORM_CPU_DEVICES="3")
    assert forced == {"before": -1, "returned": None, "devices": 5}


def test_setup_after_jax_started_changes_nothing_and_says_so():
    assert probe("late", "setup", JAXNORM_CPU_DEVICES="3") == {"before": -1, "returned": None, "devices": 1}


@pytest.mark.parametrize("value", ["abc", "0", "-2", "", "2.5"])
def test_a_bad_device_count_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("JAXNORM_CPU_DEVICES", value)
    with pytest.raises(ConfigError, match="JAXNORM_CPU_DEVICES must be a whole number"):
        cpu_device_count()


def test_a_bad_device_count_stops_a_script_with_one_line(monkeypatch):
    monkeypatch.setenv("JAXNORM_CPU_DEVICES", "two")
    result = run_script("summary.py")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: JAXNORM_CPU_DEVICES must be a whole number of devices >= 1, not 'two'"]


# Device 0 reaches a cross-device sum `seconds` after device 1 (a loaded machine, in miniature).
STALL = """
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxnorm
jaxnorm.setup_cpu_devices()
mesh = Mesh(np.array(jax.devices()), ("d",))
def late(x):
    if x.ravel()[0] == 0:
        time.sleep(float(sys.argv[1]))
    return x
def total(x):
    y = jax.shard_map(lambda b: jax.pure_callback(late, jax.ShapeDtypeStruct(b.shape, b.dtype), b), mesh=mesh,
                      in_specs=P("d"), out_specs=P("d"))(x)
    return jnp.sum(y)
x = jax.device_put(jnp.arange(4.0), NamedSharding(mesh, P("d")))
print(os.environ.get("XLA_FLAGS"), float(jax.jit(total)(x)))
"""


def stall(seconds, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXNORM_CPU_DEVICES")}
    env = {**clean, "JAX_PLATFORMS": "cpu", "JAXNORM_CPU_DEVICES": "2", **env}
    return subprocess.run([sys.executable, "-c", STALL, str(seconds)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_setup_makes_xla_wait_for_a_late_device_instead_of_aborting():
    # XLA:CPU aborts the process when a device is about a minute late at a collective. The setup raises
    # both timeouts; XLA dies on an unknown flag, so this run also shows the flag names are XLA's.
    result = stall(0.1)
    assert result.returncode == 0, result.stderr[-2000:]
    flags, total = result.stdout.split()[:-1], float(result.stdout.split()[-1])
    assert total == 6.0
    assert {f.split("=")[0] for f in flags} == {"--xla_cpu_collective_call_warn_stuck_timeout_seconds",
                                                "--xla_cpu_collective_call_terminate_timeout_seconds"}
    # The flags are the ones that decide: with the user's 1-second timeouts (kept by the setup), a
    # device 3 s late aborts the process.
    short = "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 " \
            "--xla_cpu_collective_call_terminate_timeout_seconds=1"
    result = stall(3, XLA_FLAGS=short)
    assert result.returncode != 0 and "Termination timeout" in result.stderr


# A jitted function whose one temporary buffer (64 MB) is above glibc's largest mmap threshold (32 MB).
PAGE_FAULTS = """
import json, resource
import jaxnorm
reused = jaxnorm.devices.reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.outer(x, x)) @ x))  # the 4096 x 4096 product is the temporary
x = jnp.ones(4096)
for _ in range(40):  # the heap grows to fit the blocks' pattern, then stops
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"reused": reused, "faults_per_call": faults / 5}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_reusing_freed_memory_stops_page_faults_on_every_call():
    # XLA's optimised code, as users run it (not the suite's fast-compiling level 0: 45 calls of a
    # 4096 x 4096 sine would take seconds each).
    flags = os.environ.get("XLA_FLAGS", "")
    optimised = {"XLA_FLAGS": flags.replace(TEST_XLA_FLAGS, "").strip() if TEST_XLA_FLAGS else flags}

    def faults(**env):
        result = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", **optimised, **env})
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    default, opted_out = faults(), faults(JAXNORM_REUSE_MEMORY="0")
    assert default["reused"] is True and opted_out["reused"] is False
    if not _huge_pages_always():  # else the kernel maps 2 MB pages, 32 faults for 64 MB
        assert opted_out["faults_per_call"] > 10_000  # 64 MB of 4 KB pages, mapped afresh at every call
        # Measured 0 after the heap has settled, once 3,300 when it had not yet: a fifth is a clear margin.
        assert default["faults_per_call"] < opted_out["faults_per_call"] / 5


def _huge_pages_always():
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
