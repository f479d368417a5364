"""The accelerator path checked in one command: training speed and peak device memory with flax's layers
and with the CPU-tuned ones, then a full training run of one norm, timed.

    python scripts/gpu_check.py                     # one GPU or TPU; 20 epochs of bn on CIFAR-10 (JPEG copy)
    python scripts/gpu_check.py --dataset synthetic --epochs 1 --epoch-images 512 --steps 2 --repeats 1
                                                    # a smoke run, any machine

It runs scripts/benchmark.py once per layer set (JAXNORM_LAYERS=flax, then cpu), each in a process of
its own so that each reports its own peak device memory; then scripts/train.py for --epochs epochs of
--run-norm in a temporary folder, timed from start to exit (data loading, compilation, the per-epoch
evaluation and checkpoints included). Prints a table and writes --json.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.config import NORMS, ConfigError

SCRIPTS = Path(__file__).resolve().parent
CIFAR10_JPEG = SCRIPTS.parent.parent / "shared" / "data" / "cifar10-jpeg" / "cifar-10-jpeg.tar.gz"


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--norm", nargs="+", choices=NORMS, default=list(NORMS), help="norms to benchmark")
    p.add_argument("--run-norm", choices=NORMS, default="bn", help="the norm of the timed run")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the timed run (default %(default)s)")
    p.add_argument("--dataset", choices=("cifar10", "synthetic"), default="cifar10",
                   help="the timed run's data (default %(default)s, from --data-dir)")
    p.add_argument("--data-dir", default=str(CIFAR10_JPEG), help="CIFAR-10 for the timed run (default the "
                   "JPEG copy, %(default)s)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="benchmark steps per timed repeat (default "
                   "%(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="benchmark repeats (default %(default)s)")
    p.add_argument("--epoch-images", type=int, default=50_000, help="images in the benchmark's timed epoch")
    p.add_argument("--eval-images", type=int, default=10_000,
                   help="images of the benchmark's timed evaluation")
    p.add_argument("--json", default="benchmarks/gpu-check.json", help="where to write the results "
                   "(default %(default)s)")
    return p.parse_args(argv)


def run_script(name: str, args: list, env: dict | None = None) -> float:
    """scripts/<name> in a process of its own, its output shown as it comes; returns its wall seconds."""
    start = time.perf_counter()
    returncode = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                                env={**os.environ, **(env or {})}).returncode
    if returncode:
        raise ConfigError(f"scripts/{name} failed (exit {returncode}): see its message above")
    return time.perf_counter() - start


def benchmark(layers: str, args, out: Path) -> dict:
    """scripts/benchmark.py with one layer set (float32): its JSON, which holds a row per norm."""
    run_script("benchmark.py", ["--norm", *args.norm, "--batch-size", args.batch_size, "--steps", args.steps,
                                "--repeats", args.repeats, "--epoch-images", args.epoch_images,
                                "--eval-images", args.eval_images, "--no-torch",
                                "--json", out], env={"JAXNORM_LAYERS": layers})
    return json.loads(out.read_text())


def timed_run(args, workdir: Path) -> dict:
    """scripts/train.py for --epochs epochs of --run-norm (the platform's layers), timed start to exit."""
    data = ["--dataset", "synthetic", "--preset", "narrow"] if args.dataset == "synthetic" else \
        ["--data-dir", args.data_dir]
    wall = run_script("train.py", ["--norm", args.run_norm, "--epochs", args.epochs, "--batch-size",
                                      args.batch_size, *data, "--workdir", workdir, "--no-progress"])
    history = json.loads((workdir / "metrics.json").read_text())
    return {"norm": args.run_norm, "dataset": args.dataset,
            "data_dir": None if args.dataset == "synthetic" else args.data_dir,
            "epochs": len(history), "wall_s": wall,
            "epochs_s": sum(h["seconds"] for h in history),  # training only: no evaluation, no loading
            "final_test_accuracy": history[-1]["test_accuracy"]}


def main(argv=None):
    args = parse_args(argv)
    if args.dataset == "cifar10" and not Path(args.data_dir).exists():
        raise ConfigError(f"--data-dir {args.data_dir} does not exist (or pass --dataset synthetic)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxnorm-gpu-check-") as tmp:
        benchmarks = {layers: benchmark(layers, args, Path(tmp) / f"{layers}.json")
                      for layers in ("flax", "cpu")}
        run = timed_run(args, Path(tmp) / "run")
    device = benchmarks["flax"]
    header = ("layers", "norm", "train img/s (a call per step)", "epoch img/s (training's calls)",
              "compile s", "step scratch MB", "peak device MB (all norms)")
    lines = [f"device: {device['device']} ({device['platform']}) x {device['devices']} | jax {device['jax']}",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layers, result in benchmarks.items():
        peak = result.get("peak_device_bytes")
        for r in result["results"]:
            lines.append(f"| {layers} | {r['norm']} | {r['train_images_per_s']:.0f} | "
                         f"{r['epoch_images_per_s']:.0f} | {r['compile_s']:.1f} | "
                         f"{_mb(r.get('step_temp_bytes'))} | {_mb(peak)} |")
    lines += ["", f"{run['epochs']} epochs of {run['norm']} ({run['dataset']}, the platform's layers): "
              f"{run['wall_s']:.0f} s from start to exit, {run['epochs_s']:.0f} s of training epochs, "
              f"final test accuracy {run['final_test_accuracy']:.2%}",
              f"the whole check: {time.perf_counter() - start:.0f} s"]
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"benchmarks": benchmarks, "run": run,
                                           "check_s": time.perf_counter() - start}, indent=1))
    print(f"wrote {args.json}")


def _mb(size) -> str:
    return "-" if size is None else f"{size / 2**20:.0f}"


if __name__ == "__main__":
    run_main(main)
