"""Training and evaluation speed of the CIFAR-10 network on whatever devices JAX sees.

    python scripts/benchmark.py                           # bn, gn, ln at batch 128, table printed last
    python scripts/benchmark.py --norm gn --batch-size 256 --json bench.json
    python scripts/benchmark.py --precision f32 bf16       # also bfloat16 compute (--precision bf16)

For each norm (and precision): compile time; steady-state training throughput (median over repeats,
compilation excluded); evaluation throughput; and one whole epoch of --epoch-images synthetic CIFAR-sized
images through the same loop as training, against the sum of its steps (the host overhead). When PyTorch is
installed, the same network in PyTorch (benchmarks/torch_reference.py, CPU, NCHW, one thread per
core, float32) is measured once per norm, in a subprocess so the two thread pools never compete, and
the table shows jaxnorm / PyTorch. Results go to --json (default benchmarks/<platform>-<n>dev.json), with
the compiled step's scratch memory per row and the process's peak device memory (GPU, TPU).
The layers are the platform's (the first line names them); JAXNORM_LAYERS=cpu|flax measures the other set.
"""

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.config import NORMS, PRECISIONS, Config
from jaxnorm.devices import layer_choice
from jaxnorm.layers import LAYER_SETS


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--norm", nargs="+", choices=NORMS, default=list(NORMS))
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["f32"],
                   help="compute precisions to measure (bf16: bfloat16 convolutions and activations)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per timed repeat (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--epoch-images", type=int, default=50_000, help="images in the timed epoch")
    p.add_argument("--eval-images", type=int, default=10_000, help="images of the timed evaluation "
                   "(default %(default)s, CIFAR-10's test set)")
    p.add_argument("--steps-per-call", type=int, help="steps per compiled call in the timed epoch "
                   "(default: training's, 1 on CPU and the whole epoch on GPUs/TPUs)")
    p.add_argument("--json", help="write the results here (default benchmarks/<platform>-<n>dev.json)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if installed")
    args = p.parse_args(argv)
    epoch_steps = args.epoch_images // args.batch_size
    if args.eval_images <= 0:
        p.error("--eval-images must be positive")
    if not 0 < args.steps <= epoch_steps:
        p.error(f"--steps must be in 1..{epoch_steps} (the steps of one --epoch-images epoch)")
    return args


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_norm(norm, precision, args):
    import jax
    import numpy as np

    from jaxnorm.data import synthetic_dataset
    from jaxnorm.evaluate import make_predict
    from jaxnorm.train import (
        compiled_train_calls,
        compiled_train_step,
        epoch_call_results,
        make_epoch_order,
        seconds_per_step,
        setup_run,
        steps_per_call,
    )

    config = Config(norm=norm, batch_size=args.batch_size, dataset="synthetic", precision=precision,
                    steps_per_call=args.steps_per_call).validate()
    data = synthetic_dataset(args.epoch_images, args.eval_images)
    run = setup_run(config, data)
    mesh, state, steps_per_epoch = run.mesh, run.state, run.steps_per_epoch
    images, labels = run.images, run.labels
    order = make_epoch_order(config, mesh, args.epoch_images)(0)

    step = compiled_train_step(config, mesh)
    start = time.perf_counter()
    step = step.lower(state, images, labels, order, 0).compile()
    compile_s = time.perf_counter() - start
    memory = step.memory_analysis()  # the step's scratch memory (the CPU layers' im2col patches live here)
    one_step = compiled_train_calls(config, mesh, 1, train_step=step)
    step_s, state = seconds_per_step(one_step, state, images, labels, order, args.steps, args.repeats,
                                     warmup=min(3, steps_per_epoch))

    predict = make_predict(mesh, config.eval_batch_size)
    predict(state, data.test_images[:config.eval_batch_size])  # compile
    eval_s = timed(lambda: predict(state, data.test_images).block_until_ready(), max(1, args.repeats // 2))

    # One epoch as training runs it (no progress bar): calls of steps_per_call steps (1 on CPU, the whole
    # epoch on GPUs/TPUs), the metrics fetched once at the end.
    per_call = steps_per_call(config, steps_per_epoch)
    train_calls = one_step if per_call == 1 else compiled_train_calls(config, mesh, per_call)

    def epoch():
        nonlocal state
        losses = []
        for call_state, call_losses, _, _ in epoch_call_results(train_calls, state, images, labels, order):
            state = call_state  # the next repeat starts from where this one ended
            losses.append(call_losses)
        float(np.mean(np.concatenate(jax.device_get(losses))))

    state, *_ = train_calls(state, images, labels, order, 0)  # compiles a call of several steps
    epoch_s = timed(epoch, 1)
    return {"norm": norm, "precision": precision, "layers": run.model.layer_set,
            "batch_size": config.batch_size, "devices": mesh.devices.size, "compile_s": compile_s,
            "step_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            "epoch_images_per_s": steps_per_epoch * config.batch_size / epoch_s,
            "train_images_per_s": config.batch_size / step_s,
            "eval_images_per_s": len(data.test_images) / eval_s, "epoch_s": epoch_s,
            "steps_sum_s": steps_per_epoch * step_s, "steps_per_call": per_call,
            "epoch_overhead": (epoch_s - steps_per_epoch * step_s) / epoch_s}


TORCH_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks",
                               "torch_reference.py")


def bench_torch(norm, args):
    """The PyTorch reference for `norm` in a fresh process (its threads and ours never overlap)."""
    threads = min(os.cpu_count() or 1, 8)
    out = subprocess.run([sys.executable, TORCH_REFERENCE, "--norm", norm,
                          "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                          "--repeats", str(args.repeats), "--threads", str(threads),
                          "--dropout", str(Config().dropout)],  # the same network as jaxnorm's default
                         capture_output=True, text=True)
    if out.returncode:
        print(f"warning: the PyTorch reference failed: {out.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    import flax
    import jax
    import optax

    device = jax.devices()[0]
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    print(f"device: {device.device_kind} ({device.platform}) x {jax.device_count()} | jax {jax.__version__} "
          f"flax {flax.__version__} optax {optax.__version__} | python {platform.python_version()} "
          f"| {os.cpu_count()} CPU cores | PyTorch reference: "
          f"{'yes' if with_torch else 'no (--no-torch)' if args.no_torch else 'no (not installed)'} "
          f"| layers: {LAYER_SETS[layer_choice()].description}")
    rows = []
    for norm in args.norm:
        torch = None
        for precision in args.precision:
            rows.append(bench_norm(norm, precision, args))
            if with_torch and torch is None:  # float32, once per norm, right after jaxnorm's first row
                torch = bench_torch(norm, args)
            rows[-1]["torch"] = torch
            print(json.dumps(rows[-1]), flush=True)
    header = ("norm", "precision", "batch", "devices", "compile s", "train img/s", "eval img/s", "eval/train",
              "steps per call", "epoch s", "sum of steps s", "overhead", "PyTorch train img/s",
              "PyTorch eval img/s", "train jaxnorm/PyTorch")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        t = r.get("torch")
        vs = (f"{t['train_images_per_s']:.0f} | {t['eval_images_per_s']:.0f} | "
              f"{r['train_images_per_s'] / t['train_images_per_s']:.2f}x") if t else "- | - | -"
        lines.append(f"| {r['norm']} | {r['precision']} | {r['batch_size']} | {r['devices']} | "
                     f"{r['compile_s']:.1f} | {r['train_images_per_s']:.0f} | {r['eval_images_per_s']:.0f} | "
                     f"{r['eval_images_per_s'] / r['train_images_per_s']:.1f}x | {r['steps_per_call']} | "
                     f"{r['epoch_s']:.1f} | {r['steps_sum_s']:.1f} | {r['epoch_overhead']:.1%} | {vs} |")
    path = args.json or os.path.join(os.path.dirname(TORCH_REFERENCE),
                                     f"{device.platform}-{jax.device_count()}dev.json")
    with open(path, "w") as f:
        json.dump({"device": str(device.device_kind), "platform": device.platform,
                   "devices": jax.device_count(),
                   "cpu_cores": os.cpu_count(), "jax": jax.__version__, "layers": layer_choice(),
                   # The process's peak, over every row (None where the platform does not say: the CPU).
                   "peak_device_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use"),
                   "results": rows}, f, indent=1)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
