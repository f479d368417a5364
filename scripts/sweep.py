"""The batch-size study: train every norm x batch size x seed, plot test error against batch size.

    python scripts/sweep.py --data-dir /path/to/cifar-10-binary.tar.gz    # bn gn ln x 2..128 x 3 seeds x 20 epochs
    python scripts/sweep.py --data-dir DATA --train-images 3000 --epochs 2 --seeds 0 1 --data-label "CIFAR-10 (JPEG)"
    python scripts/sweep.py --data-dir DATA --time-steps 30                     # step time at each batch, then exit
    python scripts/sweep.py --dataset synthetic --epochs 1 --seeds 0 --batch-sizes 4 32 --preset narrow   # smoke test

Learning rate: --lr (the batch-128 rate, default the recipe's 0.05) x B / 128, the linear scaling rule
the GroupNorm paper used; every batch size trains --epochs epochs (the same images seen). BatchNorm is
evaluated with its running averages and with the statistics of test batches of the training batch size.

Runs live in <runs>/<norm>-b<batch>-s<seed> (default runs: checkpoints/sweep/<dataset name>); a finished
run is reused, an unfinished one resumed. Writes <out>/batch-sweep.md, .png and .json (default out:
results/<dataset name>).
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.config import DATASETS, NORMS, WIDTH_PRESETS, Config, ConfigError

DEFAULTS = Config()


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=DEFAULTS.dataset, help="(default %(default)s)")
    p.add_argument("--data-dir", help="CIFAR-10 archive or batch folder, or a TFDS data dir")
    p.add_argument("--train-images", type=int,
                   help="train on the first N training images only (the test set stays whole)")
    p.add_argument("--train-split", type=int, help="carve train/test from one file set (see train.py --help)")
    p.add_argument("--data-label", help="the data's name in the report and figure (default: from the data)")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="(default: all)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64, 128],
                   help="(default 2 4 8 16 32 64 128)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default 0 1 2)")
    p.add_argument("--epochs", type=int, help="at every batch size (default: the dataset's, 20 for cifar10)")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr,
                   help="learning rate at batch 128, scaled x B/128 (default %(default)s)")
    p.add_argument("--preset", choices=sorted(WIDTH_PRESETS), default="seed",
                   help="channel widths: " + ", ".join(f"{k}={w}/{t}" for k, (w, t) in WIDTH_PRESETS.items()))
    p.add_argument("--runs", help="folder of the run folders (default checkpoints/sweep/<dataset name>)")
    p.add_argument("--out", help="report folder (default results/<dataset name>)")
    p.add_argument("--time-steps", type=int, metavar="N",
                   help="only measure: median seconds per step over N steps at each batch size, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("seeds", "batch_sizes", "norms"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be distinct")
    if min(args.batch_sizes) <= 0:
        p.error("--batch-sizes must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    width, transition = WIDTH_PRESETS[args.preset]
    given = {k: getattr(args, k) for k in ("epochs", "train_split", "train_images") if getattr(args, k) is not None}
    base = Config.for_dataset(args.dataset, data_dir=args.data_dir, width=width, transition_width=transition,
                              lr=args.lr, **given)
    for norm in args.norms:
        base.replace(norm=norm).validate()

    from jaxnorm.data import TFDS_SOURCES, first_train_images, load_dataset
    from jaxnorm.study import dataset_name, describe_data
    from jaxnorm.sweep import format_step_times, run_sweep, time_steps, write_sweep

    dataset = first_train_images(load_dataset(args.dataset, args.data_dir, train_split=base.train_split),
                                 base.train_images)
    if max(args.batch_sizes) > len(dataset.train_images):
        raise ConfigError(f"--batch-sizes {max(args.batch_sizes)} exceeds the {len(dataset.train_images)} "
                          "training images")
    name = dataset_name(args.dataset, dataset)
    if args.time_steps:
        for norm in args.norms:
            rows = time_steps(base.replace(norm=norm), dataset, args.batch_sizes, steps=args.time_steps)
            print(format_step_times(rows, norm, len(dataset.train_images)), flush=True)
        return
    n, m = len(dataset.train_images), len(dataset.test_images)
    data = describe_data(args.dataset, dataset)
    if args.data_label:
        data = f"{args.data_label}, {n:,} training / {m:,} test images from `{dataset.source}`"
    label = f"{args.data_label or TFDS_SOURCES.get(args.dataset, [args.dataset])[0]}, {n:,} training images"
    runs_root = Path(args.runs or os.path.join("checkpoints", "sweep", name))
    out = Path(args.out or os.path.join("results", name))
    records = run_sweep(base, dataset, norms=args.norms, batch_sizes=args.batch_sizes, seeds=args.seeds,
                        runs_root=runs_root, progress=not args.no_progress)
    command = shlex.join(["python", "scripts/sweep.py", *sys.argv[1:]])
    path = write_sweep(records, out, data=data, base=base, command=command, label=label)
    print(f"wrote {path}")


if __name__ == "__main__":
    from jaxnorm.train import TrainingError

    run_main(main, extra_errors=(TrainingError,))
