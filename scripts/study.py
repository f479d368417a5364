"""The normalisation study: train every norm x seed (reusing finished runs), evaluate, write study.md.

    python scripts/study.py --data-dir /path/to/cifar-10-binary.tar.gz            # full CIFAR-10, 3 seeds x 20 epochs
    python scripts/study.py --data-dir ../shared/data/cifar10-subset/cifar-10-binary.tar.gz   # the 5,085-image subset
    python scripts/study.py --dataset synthetic --epochs 1 --seeds 0 --preset narrow          # smoke test

Runs live in <runs>/<norm>[-skip]-s<seed> (default runs: checkpoints/study/<dataset name>); a finished
run is reused, an unfinished one resumed. Writes <out>/study.md, <out>/curves.png and
<out>/misclassified-<norm>.png (default out: results/<dataset name>).
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from jaxnorm.cli import OneLineParser, run_main
from jaxnorm.config import DATASETS, NORMS, WIDTH_PRESETS, Config

DEFAULTS = Config()


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=DEFAULTS.dataset, help="(default %(default)s)")
    p.add_argument("--data-dir", help="CIFAR-10 archive / MNIST idx folder, or a TFDS data dir")
    p.add_argument("--train-split", type=int, help="carve train/test from one file set (see train.py --help)")
    p.add_argument("--l1", type=float, default=0.0, help="L1 weight on conv kernels (default 0)")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="(default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default 0 1 2)")
    p.add_argument("--epochs", type=int, help="(default: the dataset's, 20 for cifar10, 15 for mnist)")
    p.add_argument("--groups", type=int, help="GroupNorm groups (default: the dataset's, 8 for cifar10, 2 for mnist)")
    p.add_argument("--preset", choices=sorted(WIDTH_PRESETS), default="seed",
                   help="channel widths: " + ", ".join(f"{k}={w}/{t}" for k, (w, t) in WIDTH_PRESETS.items()))
    p.add_argument("--skip", action="store_true", help="residual connections around the 3x3 convs")
    p.add_argument("--batch-size", type=int, help="(default: the dataset's, 128 for cifar10, 64 for mnist)")
    p.add_argument("--runs", help="folder of the run folders (default checkpoints/study/<dataset name>)")
    p.add_argument("--out", help="report folder (default results/<dataset name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    return args


def main(argv=None):
    args = parse_args(argv)
    width, transition = WIDTH_PRESETS[args.preset]
    given = {k: getattr(args, k) for k in ("epochs", "groups", "batch_size", "train_split")
             if getattr(args, k) is not None}
    base = Config.for_dataset(args.dataset, data_dir=args.data_dir, width=width, transition_width=transition,
                              skip=args.skip, l1=args.l1, **given)
    variant = ("-skip" if args.skip else "") + (f"-l1_{args.l1:g}" if args.l1 else "")
    for norm in args.norms:
        base.replace(norm=norm).validate()

    from jaxnorm.data import load_dataset
    from jaxnorm.report import restore_run, write_run_report
    from jaxnorm.runlock import RunLock
    from jaxnorm.study import dataset_name, run_history, train_or_reuse, write_study

    dataset = load_dataset(args.dataset, args.data_dir, train_split=base.train_split)
    name = dataset_name(args.dataset, dataset)
    runs_root = Path(args.runs or os.path.join("checkpoints", "study", name))
    out = Path(args.out or os.path.join("results", name))
    out.mkdir(parents=True, exist_ok=True)

    records = {}  # norm -> [evaluation record per seed]
    for norm in args.norms:
        for seed in args.seeds:
            config = base.replace(norm=norm, seed=seed)
            workdir = runs_root / f"{norm}{variant}-s{seed}"
            train_or_reuse(config, workdir, dataset, progress=not args.no_progress)
            with RunLock(workdir):  # it writes the report into the run folder: not while another process trains it
                record = write_run_report(restore_run(workdir), dataset)
            record["history"] = run_history(workdir)
            records.setdefault(norm, []).append(record)
        shutil.copyfile(runs_root / f"{norm}{variant}-s{args.seeds[0]}" / "misclassified.png",
                        out / f"misclassified-{norm}{variant}.png")
    command = " ".join(["python", "scripts/study.py", *sys.argv[1:]])
    path = write_study(records, dataset, out, dataset_key=args.dataset, variant=variant, command=command)
    print(f"wrote {path}")


if __name__ == "__main__":
    from jaxnorm.train import TrainingError

    run_main(main, extra_errors=(TrainingError,))
