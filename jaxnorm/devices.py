"""What runs where: the platform, read before JAX starts, and the CPU's own setup.

`accelerator()` says whether this process will run on a GPU or TPU, from what JAX itself reads when
it starts (JAX_PLATFORM_NAME, JAX_PLATFORMS, and the plugins it would load), without starting it.
One decision then follows from it:

- The layers (`layer_choice()`): on a CPU host the CPU-tuned convolution, max pooling and GroupNorm
  of `jaxnorm.layers`, measured faster on XLA:CPU; on a GPU or TPU host flax's own, whose gradients
  XLA gives to cuDNN or the TPU's convolution unit. $JAXNORM_LAYERS=cpu|flax forces either. Both
  build the same parameters, so a checkpoint trained with one restores and evaluates with the other.
- The process (`setup_cpu_devices()`), on a CPU host only: one JAX device per core and glibc's malloc
  set to reuse freed memory. On a GPU or TPU host it changes nothing: no libc setting, no XLA_FLAGS
  (an XLA that does not know a flag aborts at start-up).

XLA's CPU convolutions keep only about 1.4 of 2 cores busy; the same step data-parallel over one
device per core (through the mesh in `jaxnorm.parallel`, which also serves GPUs and TPUs) ran about
1.45x faster here and trains the same model (benchmarks/NOTES.md). glibc's malloc otherwise makes
XLA:CPU page-fault its per-step temporary buffers in afresh at every step. The scripts call
`setup_cpu_devices()` (through `jaxnorm.cli.run_main`); `import jaxnorm` changes nothing, so a library
user calls it if they want it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

from jaxnorm.config import ConfigError

ENV = "JAXNORM_CPU_DEVICES"
LAYERS_ENV = "JAXNORM_LAYERS"
LAYER_CHOICES = ("cpu", "flax")
MAX_DEFAULT = 8  # beyond this, more devices mostly add collective overhead to a 128-image batch


def accelerator() -> str | None:
    """What points this process to a GPU or TPU (e.g. 'JAX_PLATFORMS=cuda', 'libtpu'), or None for the
    CPU. Read as JAX will read it when it starts, without starting it:

    1. JAX_PLATFORM_NAME, then the first of JAX_PLATFORMS (JAX's default backend): 'cpu' or another;
    2. else an accelerator plugin installed: libtpu, or any PJRT plugin (the CUDA and ROCm ones), which
       JAX prefers to the CPU. A plugin that finds no device leaves JAX on the CPU: set
       JAX_PLATFORMS=cpu (or $JAXNORM_LAYERS=cpu) there.
    """
    for var in ("JAX_PLATFORM_NAME", "JAX_PLATFORMS"):
        first = os.environ.get(var, "").split(",")[0].strip().lower()
        if first:
            return None if first == "cpu" else f"{var}={os.environ[var]}"
    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):  # plugins named by path, which JAX loads too
        return "PJRT_NAMES_AND_LIBRARY_PATHS"
    plugins = _installed_plugins()
    return plugins[0] if plugins else None


@functools.cache  # the installed packages do not change while the process runs
def _installed_plugins() -> tuple[str, ...]:
    """libtpu and the JAX plugins, found the two ways JAX finds them: the `jax_plugins` namespace
    package and the `jax_plugins` entry points."""
    found = ["libtpu"] if importlib.util.find_spec("libtpu") else []
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace and namespace.submodule_search_locations:
        found += [f"jax_plugins.{m.name}" for m in pkgutil.iter_modules(namespace.submodule_search_locations)]
    found += [entry.value for entry in importlib.metadata.entry_points(group="jax_plugins")]
    return tuple(found)


def layer_choice() -> str:
    """The layers models are built with (`jaxnorm.layers.LAYER_SETS`): $JAXNORM_LAYERS if set, else
    'cpu' (the CPU-tuned layers) on a CPU host and 'flax' (flax's own) on a GPU or TPU host."""
    value = os.environ.get(LAYERS_ENV)
    if not value:
        return "flax" if accelerator() else "cpu"
    if value not in LAYER_CHOICES:
        raise ConfigError(f"{LAYERS_ENV} must be one of {', '.join(LAYER_CHOICES)}, not {value!r}")
    return value


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
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
                mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)])


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
    """On a CPU host, make JAX's CPU backend `cpu_device_count()` devices and malloc reuse freed memory
    (`reuse_freed_memory`). Call before JAX starts its backends.

    Returns the count set, or None where the process is left alone: a GPU or TPU host (`accelerator()`),
    XLA_FLAGS already forcing a count (the user chose), or JAX's backends already running (too late: JAX
    keeps the devices it has). A bad $JAXNORM_CPU_DEVICES or $JAXNORM_LAYERS raises ConfigError, on any
    host, so a typo never goes unnoticed.
    """
    count = cpu_device_count()
    layer_choice()
    if accelerator():
        return None
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
