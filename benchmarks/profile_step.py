"""Per-HLO-op time of one training step (jax.profiler trace, CPU thunk events), one CPU device.

    python benchmarks/profile_step.py bn train     # or: gn eval, ...
    B=64 python benchmarks/profile_step.py bn train  # batch 64: one device's share of 128 on two devices
"""
import collections
import glob
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAXNORM_CPU_DEVICES", "1")  # read when the CPU devices are set up, below
import jaxnorm  # noqa: E402

jaxnorm.setup_cpu_devices()
import jax  # noqa: E402
import optax  # noqa: E402
from jax._src.lib import _profile_data  # noqa: E402

from jaxnorm.config import Config  # noqa: E402
from jaxnorm.models import build_model, init_variables  # noqa: E402

norm, what = sys.argv[1], sys.argv[2]
batch = int(os.environ.get("B", 128))
model = build_model(Config(norm=norm, dataset="synthetic"))
v = init_variables(model, (32, 32, 3))
x = jax.random.uniform(jax.random.PRNGKey(0), (batch, 32, 32, 3), maxval=255)
y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)


def loss(params):
    logits, _ = model.apply({**v, "params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


f = jax.jit(lambda p: model.apply({**v, "params": p}, x)) if what == "eval" else jax.jit(jax.grad(loss))
jax.block_until_ready(f(v["params"]))
d = tempfile.mkdtemp()
shutil.rmtree(d, ignore_errors=True)
with jax.profiler.trace(d):
    for _ in range(3):
        jax.block_until_ready(f(v["params"]))
path = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
pd = _profile_data.ProfileData.from_file(path)
tot, cnt = collections.Counter(), collections.Counter()
for plane in pd.planes:
    for line in plane.lines:
        for ev in line.events:
            key = (plane.name, line.name, ev.name)
            tot[key] += ev.duration_ns
            cnt[key] += 1
for k, t in tot.most_common(45):
    print(f"{t / 3 / 1e6:9.2f} ms  x{cnt[k] // 3:3d}  {k[0][:20]} | {k[1][:25]} | {k[2][:90]}")
