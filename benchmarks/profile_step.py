"""Per-HLO-op time of one training step (jax.profiler trace, CPU thunk events), one CPU device.

    python benchmarks/profile_step.py bn train     # or: gn eval, ...
    B=64 python benchmarks/profile_step.py bn train  # batch 64: one device's share of 128 on two devices
"""
import collections, glob, os, shutil, sys, tempfile
os.environ.setdefault("JAXNORM_CPU_DEVICES", "1")
import jaxnorm

jaxnorm.setup_cpu_devices()
import jax, optax
from jax._src.lib import _profile_data
from jaxnorm.config import Config
from jaxnorm.models import build_model, init_variables
norm, what = sys.argv[1], sys.argv[2]
model = build_model(Config(norm=norm, dataset="synthetic"))
v = init_variables(model, (32, 32, 3))
x = jax.random.uniform(jax.random.PRNGKey(0), (int(os.environ.get("B", 128)), 32, 32, 3), maxval=255)
y = jax.random.randint(jax.random.PRNGKey(1), (int(os.environ.get("B", 128)),), 0, 10)
def loss(params):
    logits, _ = model.apply({**v, "params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
f = jax.jit(lambda p: model.apply({**v, "params": p}, x)) if what == "eval" else jax.jit(jax.grad(loss))
jax.block_until_ready(f(v["params"]))
d = tempfile.mkdtemp(); shutil.rmtree(d, ignore_errors=True)
with jax.profiler.trace(d):
    for _ in range(3): jax.block_until_ready(f(v["params"]))
path = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
pd = _profile_data.ProfileData.from_file(path)
tot = collections.Counter(); cnt = collections.Counter()
for plane in pd.planes:
    for line in plane.lines:
        for ev in line.events:
            tot[(plane.name, line.name, ev.name)] += ev.duration_ns; cnt[(plane.name, line.name, ev.name)] += 1
for k, t in tot.most_common(45):
    print(f"{t/3/1e6:9.2f} ms  x{cnt[k]//3:3d}  {k[0][:20]} | {k[1][:25]} | {k[2][:90]}")
