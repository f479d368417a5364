"""CPU devices: split the host CPU into one JAX device per core, explicitly, before JAX starts.

XLA's CPU convolutions keep only about 1.4 of 2 cores busy; the same step data-parallel over one
device per core (through the mesh in `jaxnorm.parallel`, which also serves GPUs and TPUs) ran about
1.45x faster here and trains the same model (benchmarks/NOTES.md). GPUs and TPUs are unaffected: the
setting only shapes the CPU backend. The scripts call `setup_cpu_devices()` (through
`jaxnorm.cli.run_main`); `import jaxnorm` changes nothing, so a library user calls it if they want it.
"""

from __future__ import annotations

import os

from jaxnorm.config import ConfigError

ENV = "JAXNORM_CPU_DEVICES"
MAX_DEFAULT = 8  # beyond this, more devices mostly add collective overhead to a 128-image batch

# XLA:CPU aborts the process (SIGABRT, no Python error) when a CPU device reaches a collective about a
# minute after the others (measured: a device 70 s late aborts, 45 s does not). A device starved on a
# loaded machine can be that late; 10 minutes still ends a true deadlock with XLA's own message.
COLLECTIVE_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
                            "--xla_cpu_collective_call_terminate_timeout_seconds=600")


def cpu_device_count() -> int:
    """How many CPU devices to make: $JAXNORM_CPU_DEVICES, else one per core (at most 8)."""
    value = os.environ.get(ENV)
    if value is None:
        return min(os.cpu_count() or 1, MAX_DEFAULT)
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{ENV} must be a whole number of devices >= 1, not {value!r}")
    return count


def setup_cpu_devices() -> int | None:
    """Make JAX's CPU backend `cpu_device_count()` devices. Call before JAX starts its backends.

    Returns the count set, or None where it is left alone: XLA_FLAGS already forces a count (the user
    chose), or JAX's backends are already running (too late: JAX keeps the devices it has).
    A bad $JAXNORM_CPU_DEVICES raises ConfigError.
    """
    count = cpu_device_count()  # validated even when unused, so a typo never goes unnoticed
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        return None  # backends already initialised (jax was used first): keep them as they are
    flags = os.environ.get("XLA_FLAGS", "")
    patient = [f for f in COLLECTIVE_TIMEOUT_FLAGS if f.split("=")[0] not in flags]  # the user's value wins
    if count > 1 and patient:
        os.environ["XLA_FLAGS"] = " ".join([flags, *patient]).strip()  # read when the backend starts
    return count
