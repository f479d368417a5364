"""The normalisation study: train every norm x seed (reusing finished runs), evaluate, write study.md.

    python scripts/study.py --data-dir /path/to/cifar-10-binary.tar.gz  # full CIFAR-10, 3 seeds x 20 epochs
    python scripts/study.py --data-dir ../shared/data/cifar10-subset/cifar-10-binary.tar.gz  # 5,085 images
    python scripts/study.py --dataset synthetic --epochs 1 --seeds 0 --preset narrow  # smoke test

Every training option of scripts/train.py applies to all runs (--norm and --seed are --norms and --seeds
here). Runs live in <runs>/<norm><variant>-s<seed>, the variant as -skip, -relu-first, -ws, -whitened or
-l1_X (default runs: checkpoints/study/<dataset name>); a finished run is reused, an unfinished one
resumed (also after Ctrl-C: run the same command again). Every figure is of the final checkpoints; a
run's evaluation.json is reused while its final checkpoint is the same (--reevaluate: evaluate each run
anew). Writes <out>/study.md, <out>/curves.png and <out>/misclassified-<norm>.png (default out:
results/<dataset name>). With --train-split the runs are evaluated on validation images held out of the
training files, and the report says "validation".
"""

import os
import shutil
import sys
from pathlib import Path

from jaxnorm.cli import OneLineParser, add_config_options, command_line, config_from_args, run_main
from jaxnorm.config import NORMS
from jaxnorm.data import load_dataset
from jaxnorm.evaluate import run_report
from jaxnorm.runlock import RunLock
from jaxnorm.study import (
    dataset_name,
    report_command,
    run_variant,
    shared_variant,
    train_or_reuse,
    write_study,
)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    s = p.add_argument_group("study")
    s.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="(default: all)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default 0 1 2)")
    s.add_argument("--runs", help="folder of the run folders (default checkpoints/study/<dataset name>)")
    s.add_argument("--out", help="report folder (default results/<dataset name>)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--reevaluate", action="store_true", help="evaluate every run again (default: a run's "
                   "evaluation.json of its final checkpoint on this data is reused)")
    add_config_options(p, exclude=("norm", "seed"))
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    return args


def main(argv=None):
    args = parse_args(argv)
    # Each norm's config: the options given, over its own defaults (config.NORM_DEFAULTS).
    configs = {norm: config_from_args(args, norm=norm) for norm in args.norms}
    base = configs[args.norms[0]]
    # The report's files carry the variant all norms share, over every norm so that --norms renames
    # nothing (a norm not studied is only looked at: an option invalid for it, as --groups, is no error).
    variant = shared_variant([config_from_args(args, norm=norm, validate=False) for norm in NORMS])

    dataset = load_dataset(base.dataset, base.data_dir, train_split=base.train_split)
    name = dataset_name(base.dataset, dataset)
    runs_root = Path(args.runs or os.path.join("checkpoints", "study", name))
    out = Path(args.out or os.path.join("results", name))
    out.mkdir(parents=True, exist_ok=True)

    records = {}  # norm -> [evaluation record per seed]
    for norm in args.norms:
        workdirs = [runs_root / f"{norm}{run_variant(configs[norm])}-s{seed}" for seed in args.seeds]
        for seed, workdir in zip(args.seeds, workdirs, strict=True):
            config = configs[norm].replace(seed=seed)
            train_or_reuse(config, workdir, dataset, progress=not args.no_progress)
            # The report is written into the run folder: not while another process trains it.
            with RunLock(workdir):
                records.setdefault(norm, []).append(run_report(workdir, dataset, reuse=not args.reevaluate))
        shutil.copyfile(workdirs[0] / "misclassified.png", out / f"misclassified-{norm}{variant}.png")
    path = write_study(records, dataset, out, dataset_key=base.dataset, variant=variant,
                       command=report_command(__file__, sys.argv[1:]))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main, resume_with=command_line(sys.argv[1:]))
