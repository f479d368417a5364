"""The batch-size study: train every norm x batch size x seed, plot test error against batch size.

    python scripts/sweep.py --data-dir DATA --epochs 10 --seeds 0 1          # bn gn ln x batch 2..128
    python scripts/sweep.py --data-dir DATA --epochs 10 --seeds 0 1 2        # later: trains only seed 2
    python scripts/sweep.py --data-dir DATA --epochs 10 --seeds 0 1 --report-only   # the finished runs only
    python scripts/sweep.py --data-dir DATA --time-steps 30                  # step time per batch, then exit
    python scripts/sweep.py --data-dir DATA --epochs 10 --seeds 0 1 --fixed-steps 3125   # + same-steps view
    python scripts/sweep.py --dataset synthetic --epochs 1 --seeds 0 --batch-sizes 4 32 --preset narrow \
        --runs /tmp/sweep-runs --out /tmp/sweep                              # smoke test

The recipe is the default one (or as the options change it) at every batch B, with the learning rate
scaled linearly, --lr x B / 128 (0.1 x B / 128 by default; 64 for MNIST), the GroupNorm paper's rule. Every
batch trains --epochs epochs (the same images seen; the warm-up is counted in epochs too). BatchNorm is
evaluated with its running averages (the main column) and with the statistics of test batches of the
training batch size. --fixed-steps N adds a small table of --fixed-steps-batch-sizes trained for the
whole epochs closest to N steps each, which separates the number of steps from the batch.

Runs live in <runs>/<norm>-b<batch>-e<epochs>-s<seed> (default runs: results/<dataset name>/sweep-runs):
a finished run is reused, an unfinished one resumed, so a later call with more seeds or another
--epochs trains only what is missing (another epoch count is another run: a linear decay stretched to
more epochs is not the longer recipe). A finished run keeps its final checkpoint and metrics.json
only, small enough to commit. Writes <out>/batch-sweep.md, .png and .json (default out:
results/<dataset name>).
"""

import os
import sys
from pathlib import Path

from jaxnorm.cli import OneLineParser, add_config_options, command_line, config_from_args, run_main
from jaxnorm.config import NORMS, ConfigError
from jaxnorm.data import first_train_images, load_dataset
from jaxnorm.study import data_title, dataset_name, describe_data, report_command
from jaxnorm.sweep import fixed_steps_epochs, format_step_times, run_sweep, time_steps, write_sweep


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    s = p.add_argument_group("sweep")
    s.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="(default: all)")
    s.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64, 128],
                   help="(default 2 4 8 16 32 64 128)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default 0 1 2)")
    s.add_argument("--data-label", help="the data's name in the report and figure (default: from the data, "
                   "e.g. CIFAR-10 (JPEG copy))")
    s.add_argument("--runs", help="folder of the run folders (default results/<dataset name>/sweep-runs)")
    s.add_argument("--out", help="report folder (default results/<dataset name>)")
    s.add_argument("--fixed-steps", type=int, metavar="N",
                   help="also train --fixed-steps-batch-sizes for about N steps each (whole epochs), "
                   "reported as a table of its own")
    s.add_argument("--fixed-steps-batch-sizes", nargs="+", type=int, default=[16, 128], metavar="B",
                   help="(default 16 128)")
    s.add_argument("--time-steps", type=int, metavar="N",
                   help="only measure: median seconds per step over N steps at each batch size, then exit")
    s.add_argument("--report-only", action="store_true",
                   help="train nothing: report the finished runs and name the missing ones")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Every recipe option applies to all runs; --lr belongs to the dataset's default batch (128 for CIFAR-10).
    add_config_options(p, exclude=("norm", "seed", "batch_size"))
    args = p.parse_args(argv)
    for name in ("seeds", "batch_sizes", "norms", "fixed_steps_batch_sizes"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be distinct")
    if min(args.batch_sizes + args.fixed_steps_batch_sizes) <= 0:
        p.error("--batch-sizes must be positive")
    if args.fixed_steps is not None and args.fixed_steps <= 0:
        p.error("--fixed-steps must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    base = config_from_args(args)
    for norm in args.norms:
        base.replace(norm=norm).validate()

    dataset = first_train_images(load_dataset(base.dataset, base.data_dir, train_split=base.train_split),
                                 base.train_images)
    fixed_sizes = args.fixed_steps_batch_sizes if args.fixed_steps else []
    if max(args.batch_sizes + fixed_sizes) > len(dataset.train_images):
        raise ConfigError(f"--batch-sizes {max(args.batch_sizes + fixed_sizes)} exceeds the "
                          f"{len(dataset.train_images)} training images")
    for b in fixed_sizes:  # refused now, not after the main sweep has trained
        fixed_steps_epochs(len(dataset.train_images), b, args.fixed_steps)
    name = dataset_name(base.dataset, dataset)
    if args.time_steps:
        for norm in args.norms:
            rows = time_steps(base.replace(norm=norm), dataset, args.batch_sizes, steps=args.time_steps)
            print(format_step_times(rows, norm, len(dataset.train_images)) + "\n", flush=True)
        return
    data = describe_data(base.dataset, dataset, args.data_label)
    label = (f"{args.data_label or data_title(base.dataset, dataset)}, "
             f"{len(dataset.train_images):,} training images")
    runs_root = Path(args.runs or os.path.join("results", name, "sweep-runs"))
    out = Path(args.out or os.path.join("results", name))
    sweep = dict(norms=args.norms, seeds=args.seeds, runs_root=runs_root, progress=not args.no_progress,
                 train=not args.report_only)
    records = run_sweep(base, dataset, batch_sizes=args.batch_sizes, **sweep)
    fixed = (run_sweep(base, dataset, batch_sizes=fixed_sizes, fixed_steps=args.fixed_steps, **sweep)
             if args.fixed_steps else [])
    if not records:
        raise ConfigError(f"no finished run in {runs_root}: run without --report-only to train them")
    done = {(r["norm"], r["batch_size"], r["seed"]) for r in records}
    missing = [f"{norm}-b{b}-s{seed}" for seed in args.seeds for b in args.batch_sizes for norm in args.norms
               if (norm, b, seed) not in done]
    command = report_command(__file__, sys.argv[1:])
    path = write_sweep(records, out, data=data, base=base, command=command, label=label,
                       fixed_steps_records=fixed, missing=missing)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main, resume_with=command_line(sys.argv[1:]))
