"""The batch-size study: train every norm x batch size x seed, plot test error against batch size.

    python scripts/sweep.py --data-dir /path/to/cifar-10-binary.tar.gz    # bn gn ln x 2..128 x 3 seeds x 20 epochs
    python scripts/sweep.py --data-dir DATA --train-images 3000 --epochs 2 --seeds 0 1
    python scripts/sweep.py --data-dir DATA --time-steps 30                     # step time at each batch, then exit
    python scripts/sweep.py --dataset synthetic --epochs 1 --seeds 0 --batch-sizes 4 32 --preset narrow   # smoke test

Learning rate: --lr (the batch-128 rate, default the recipe's 0.1) x B / 128, the linear scaling rule
the GroupNorm paper used; every batch size trains --epochs epochs (the same images seen). BatchNorm is
evaluated with its running averages and with the statistics of test batches of the training batch size.

Runs live in <runs>/<norm>-b<batch>-s<seed> (default runs: checkpoints/sweep/<dataset name>); a finished
run is reused, an unfinished one resumed. Writes <out>/batch-sweep.md, .png and .json (default out:
results/<dataset name>).
"""

import os
import sys
from pathlib import Path

from jaxnorm.cli import OneLineParser, add_config_options, command_line, config_from_args, run_main
from jaxnorm.config import NORMS, ConfigError
from jaxnorm.data import first_train_images, load_dataset
from jaxnorm.study import data_title, dataset_name, describe_data
from jaxnorm.sweep import format_step_times, run_sweep, time_steps, write_sweep


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    s = p.add_argument_group("sweep")
    s.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="(default: all)")
    s.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64, 128],
                   help="(default 2 4 8 16 32 64 128)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default 0 1 2)")
    s.add_argument("--data-label", help="the data's name in the report and figure (default: from the data, "
                   "e.g. CIFAR-10 (JPEG copy))")
    s.add_argument("--runs", help="folder of the run folders (default checkpoints/sweep/<dataset name>)")
    s.add_argument("--out", help="report folder (default results/<dataset name>)")
    s.add_argument("--time-steps", type=int, metavar="N",
                   help="only measure: median seconds per step over N steps at each batch size, then exit")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Every recipe option applies to all runs; --lr is the rate at batch 128, scaled x B/128.
    add_config_options(p, exclude=("norm", "seed", "batch_size"))
    args = p.parse_args(argv)
    for name in ("seeds", "batch_sizes", "norms"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be distinct")
    if min(args.batch_sizes) <= 0:
        p.error("--batch-sizes must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    base = config_from_args(args)
    for norm in args.norms:
        base.replace(norm=norm).validate()

    dataset = first_train_images(load_dataset(base.dataset, base.data_dir, train_split=base.train_split),
                                 base.train_images)
    if max(args.batch_sizes) > len(dataset.train_images):
        raise ConfigError(f"--batch-sizes {max(args.batch_sizes)} exceeds the {len(dataset.train_images)} "
                          "training images")
    name = dataset_name(base.dataset, dataset)
    if args.time_steps:
        for norm in args.norms:
            rows = time_steps(base.replace(norm=norm), dataset, args.batch_sizes, steps=args.time_steps)
            print(format_step_times(rows, norm, len(dataset.train_images)), flush=True)
        return
    data = describe_data(base.dataset, dataset, args.data_label)
    label = f"{args.data_label or data_title(base.dataset, dataset)}, {len(dataset.train_images):,} training images"
    runs_root = Path(args.runs or os.path.join("checkpoints", "sweep", name))
    out = Path(args.out or os.path.join("results", name))
    records = run_sweep(base, dataset, norms=args.norms, batch_sizes=args.batch_sizes, seeds=args.seeds,
                        runs_root=runs_root, progress=not args.no_progress)
    command = command_line(sys.argv[1:]).replace(sys.argv[0], "scripts/sweep.py", 1)
    path = write_sweep(records, out, data=data, base=base, command=command, label=label)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main, resume_with=command_line(sys.argv[1:]))
