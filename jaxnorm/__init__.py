"""jaxnorm: BatchNorm, GroupNorm and LayerNorm in a small CNN, in JAX/Flax.

Importing it changes no JAX setting. On a CPU, call `jaxnorm.setup_cpu_devices()` before using JAX
to get one device per core, as the scripts do (see jaxnorm/devices.py).
"""

from jaxnorm.devices import setup_cpu_devices

__all__ = ["setup_cpu_devices"]
