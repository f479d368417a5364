"""The machine's matrix-multiply ceiling, for benchmarks/NOTES.md: float32 (numpy, jax) and bfloat16 (jax)
2048x2048 products, and the two products a 24-channel 3x3 conv layer at 32x32, batch 128 becomes as im2col.

    python benchmarks/matmul_ceiling.py
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def t(f, reps=5):
    """Best and median seconds of `reps` calls of `f`, after one warm-up call."""
    f()
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return min(ts), statistics.median(ts)


def report(label, flops, f):
    best, median = (flops / x / 1e9 for x in t(f))
    print(f"{label}: best {best:.0f} median {median:.0f} GFLOP/s")


n = 2048
a = np.random.rand(n, n).astype(np.float32)
b = np.random.rand(n, n).astype(np.float32)
fl = 2 * n**3
report("numpy f32 2048^2", fl, lambda: a @ b)
mm = jax.jit(lambda a, b: a @ b)
for dt in (jnp.float32, jnp.bfloat16):
    ja, jb = jnp.asarray(a, dt), jnp.asarray(b, dt)
    report(f"jax {jnp.dtype(dt).name} 2048^2", fl, lambda ja=ja, jb=jb: mm(ja, jb).block_until_ready())
ja = jnp.asarray(np.random.rand(131072, 216).astype(np.float32))
jb = jnp.asarray(np.random.rand(216, 24).astype(np.float32))
fl = 2 * 131072 * 216 * 24
report("jax f32 conv-shaped 131072x216 @ 216x24", fl, lambda: mm(ja, jb).block_until_ready())
mt = jax.jit(lambda a, g: a.T @ g)
g = jnp.asarray(np.random.rand(131072, 24).astype(np.float32))
report("jax f32 weight-grad 216x131072 @ 131072x24", fl, lambda: mt(ja, g).block_until_ready())
