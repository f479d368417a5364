"""Data parallelism over every device JAX sees: one mesh with a `data` axis.

Batches are global arrays sharded along `data`; parameters, optimizer state and the dataset are
replicated. XLA then computes BatchNorm statistics over the global batch, so 1 device and N devices
train the same model (up to float32 summation order), with no pmap, axis_name or pmean.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxnorm.config import ConfigError


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    # Auto axes: the compiler propagates shardings from the jit boundaries; nothing in the model
    # needs sharding-aware indexing.
    n = num_devices or jax.device_count()
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch_divides(batch_size: int, mesh, what: str = "--batch-size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(f"{what} {batch_size} is the global batch and must be divisible by the "
                          f"{n} devices in use")


def put_replicated(array: np.ndarray, mesh) -> jax.Array:
    """A host array copied to every device (the same array on every host of a multi-host job)."""
    return jax.device_put(array, replicated(mesh))
