"""Data parallelism over every device JAX sees: one mesh with a `data` axis.

Batches are global arrays sharded along `data`; parameters, optimizer state and the dataset are
replicated. XLA then computes BatchNorm statistics over the global batch, so 1 device and N devices
train the same model (up to float32 summation order), with no pmap, axis_name or pmean.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxnorm.config import ConfigError

T = TypeVar("T")

# XLA:CPU with several devices deadlocks when many multi-device calls are queued: a collective (an
# all-reduce in training, an all-gather in evaluation) waits for a device that never comes, and XLA
# aborts the process. Three 20-epoch runs died so (training queued a whole epoch), and later a study's
# evaluation (all its test batches queued). Waiting for the call before last keeps one call running and
# one queued: the devices never idle, and the queue stays short.
MAX_CALLS_IN_FLIGHT = 2


def limit_in_flight(calls: Iterable[T], output: Callable[[T], object] = lambda call: call) -> Iterator[T]:
    """Yield from `calls`, an iterable that dispatches one device call per item (lazily: a generator),
    waiting before each new item for the `output` of the call MAX_CALLS_IN_FLIGHT back."""
    in_flight = collections.deque()
    for call in calls:
        in_flight.append(output(call))
        if len(in_flight) > MAX_CALLS_IN_FLIGHT:
            jax.block_until_ready(in_flight.popleft())
        yield call


def initialize_multihost() -> None:
    """Join a multi-host job (TPU pod slice, SLURM, or an explicit coordinator), else do nothing.

    Every host then runs the same program; the mesh spans all hosts' devices, each host feeds the
    shards of the global batch that live on its own devices, and Orbax writes each checkpoint once.
    """
    env = os.environ
    multihost = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
                 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if multihost:
        jax.distributed.initialize()


def make_mesh(batch_size: int | None = None) -> jax.sharding.Mesh:
    """A 1-D `data` mesh over every device (see `devices_for_batch` for the CPU exception)."""
    n = devices_for_batch(batch_size) if batch_size else jax.device_count()
    # Auto axes: the compiler propagates shardings from the jit boundaries; nothing in the model
    # needs sharding-aware indexing.
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def describe_devices(mesh) -> str:
    """The devices a run trains on, for its first line and its metrics.json: '2 x cpu, 2 cores',
    '1 x NVIDIA H200', '8 x TPU v5 lite'."""
    device = mesh.devices.flat[0]
    cores = f", {os.cpu_count()} cores" if device.platform == "cpu" else ""
    return f"{mesh.devices.size} x {device.device_kind}{cores}"


def devices_for_batch(batch_size: int) -> int:
    """How many devices a global batch of `batch_size` is split over.

    Accelerators: all of them, and a batch they do not divide is an error. CPU "devices" are the
    cores we split the host into ourselves (see jaxnorm/devices.py), an implementation detail the
    user never chose: there the most that divide the batch are used.
    """
    n = jax.device_count()
    if jax.default_backend() == "cpu":
        return max(d for d in range(1, n + 1) if batch_size % d == 0)
    if batch_size < n:  # a batch of 2 on 4 GPUs: say what to do, not just what is wrong
        raise ConfigError(f"a batch of {batch_size} cannot be split over the {n} devices in use (one image "
                          f"each at least): use a larger batch or at most {batch_size} devices "
                          "(e.g. CUDA_VISIBLE_DEVICES=0)")
    if batch_size % n:
        raise ConfigError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                          f"{n} devices in use")
    return n


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def put_replicated(array: np.ndarray, mesh) -> jax.Array:
    """A host array copied to every device (the same array on every host of a multi-host job)."""
    return jax.device_put(array, replicated(mesh))


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (a tiny all-gather; every process must call it at the
    same point). One process: `value` itself, with no communication."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))
