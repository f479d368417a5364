"""CPU devices: split the host CPU into one JAX device per core, explicitly, before JAX starts.

XLA's CPU convolutions keep only about 1.4 of 2 cores busy; the same step data-parallel over one
device per core (through the mesh in `jaxnorm.parallel`, which also serves GPUs and TPUs) ran about
1.45x faster here and trains the same model (benchmarks/NOTES.md). GPUs and TPUs are unaffected: the
setting only shapes the CPU backend. On Linux it also makes glibc's malloc reuse freed memory, which
XLA:CPU's per-step temporary buffers otherwise page-fault in afresh at every step. The scripts call
`setup_cpu_devices()` (through `jaxnorm.cli.run_main`); `import jaxnorm` changes nothing, so a library
user calls it if they want it.
"""

from __future__ import annotations

import ctypes
import os
import sys

from jaxnorm.config import ConfigError

ENV = "JAXNORM_CPU_DEVICES"
MAX_DEFAULT = 8  # beyond this, more devices mostly add collective overhead to a 128-image batch

# XLA:CPU aborts the process (SIGABRT, no Python error) when a CPU device reaches a collective about a
# minute after the others (measured: a device 70 s late aborts, 45 s does not). A device starved on a
# loaded machine can be that late; 10 minutes still ends a true deadlock with XLA's own message.
COLLECTIVE_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
                            "--xla_cpu_collective_call_terminate_timeout_seconds=600")


# glibc's malloc serves a block above 32 MB with a fresh mmap and unmaps it again on free, and its
# per-thread arenas do so for any block too large for them. So XLA:CPU's temporary buffer for a training
# step (75 MB per device at batch 64) was mapped, page-faulted in, zeroed by the kernel and unmapped at
# every step: 18,400 page faults a step, measured with getrusage. One arena, no mmap and no trimming
# keep freed memory in the heap for the next step. $JAXNORM_REUSE_MEMORY=0 leaves malloc alone.
REUSE_MEMORY_ENV = "JAXNORM_REUSE_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
_KEEP_FREED_BYTES = 1 << 30  # freed memory kept at the heap's top before any goes back to the system


def reuse_freed_memory() -> bool:
    """Make glibc's malloc reuse freed large blocks instead of mapping fresh pages each time.

    Call before JAX starts its threads (arenas already made stay). Returns whether it was set: False
    off Linux, without glibc, or with $JAXNORM_REUSE_MEMORY=0.
    """
    if os.environ.get(REUSE_MEMORY_ENV) == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # another C library (musl): its malloc is left as it is
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)])


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

    Also makes malloc reuse freed memory (`reuse_freed_memory`). Returns the count set, or None where
    it is left alone: XLA_FLAGS already forces a count (the user chose), or JAX's backends are already
    running (too late: JAX keeps the devices it has). A bad $JAXNORM_CPU_DEVICES raises ConfigError.
    """
    count = cpu_device_count()  # validated even when unused, so a typo never goes unnoticed
    reuse_freed_memory()
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
